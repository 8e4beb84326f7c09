//! A crowd of connected certificates the fleet should never have signed
//! (see [`crate::hostile_cns`]), kept subscribed to everything while another
//! test runs, so that every isolation property is also checked with them
//! present: at the end each may have received only what was sent to the
//! topics its own CN expands to.

use edgebind_protocol::acl::pattern_grants;

use crate::{TestClient, TestFleet, hostile_cns};

pub struct HostileCrowd {
    clients: Vec<(String, TestClient)>,
}

impl HostileCrowd {
    /// Connect every hostile name that the broker lets in (wildcard names
    /// may be refused) and subscribe each to `#`.
    pub fn connect(fleet: &TestFleet) -> HostileCrowd {
        let mut clients = Vec::new();
        for cn in hostile_cns() {
            let ident = fleet.pki.hostile(&cn);
            if let Ok(client) = TestClient::connect(&ident, &fleet.broker) {
                client.subscribe("#").expect("subscribe");
                clients.push((cn, client));
            }
        }
        assert!(
            clients.len() >= hostile_cns().len() - 3,
            "only wildcard names may be refused; {} of {} connected",
            clients.len(),
            hostile_cns().len()
        );
        HostileCrowd { clients }
    }

    /// Panics if any member received a message outside its own expansions.
    pub fn assert_received_nothing_foreign(&self) {
        for (cn, client) in &self.clients {
            let own: Vec<String> = pattern_grants(cn).into_iter().map(|g| g.filter).collect();
            for m in client.received() {
                assert!(
                    own.iter()
                        .any(|f| edgebind_protocol::acl::filter_matches(f, &m.topic)),
                    "hostile {cn:?} received {}",
                    m.topic
                );
            }
        }
    }
}
