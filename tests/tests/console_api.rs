//! The console's JSON API used as a script would: `curl` over HTTPS
//! (trusting only the fleet's root CA) against `edgebind console`, with a
//! real Mosquitto, the fleet service and a real agent on 127.0.0.1.

mod fleet_support;

use std::path::Path;
use std::process::Command;

use edgebind_tests::console::{ConsoleProc, login_code};
use edgebind_tests::wait_for;
use fleet_support::{AgentTweaks, Fleet, LONG};
use serde_json::{Value, json};

/// One API call with curl: the HTTP status and the JSON body (Null if none).
struct Api {
    base: String,
    ca: std::path::PathBuf,
    token: Option<String>,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--cacert"])
            .arg(&self.ca)
            .args(["-X", method, "-w", "\n%{http_code}"])
            .args(["-H", "accept: application/json"]);
        if let Some(t) = &self.token {
            cmd.args(["-H", &format!("authorization: Bearer {t}")]);
        }
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary"])
                .arg(b.to_string());
        }
        let out = cmd
            .arg(format!("{}{path}", self.base))
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "curl {method} {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, status) = text.rsplit_once('\n').unwrap();
        let json = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()))
        };
        eprintln!("{method} {path} -> {status} {json}");
        (status.parse().unwrap(), json)
    }

    fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, json) = self.call(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {json}");
        json
    }

    fn download(&self, path: &str, to: &Path) {
        let status = Command::new("curl")
            .args(["-sSf", "--cacert"])
            .arg(&self.ca)
            .args([
                "-H",
                &format!("authorization: Bearer {}", self.token.as_deref().unwrap()),
                "-o",
            ])
            .arg(to)
            .arg(format!("{}{path}", self.base))
            .status()
            .unwrap();
        assert!(status.success(), "download {path}");
    }

    /// GET `path` until `pred` holds for its JSON.
    fn wait(&self, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(LONG, || {
            let v = self.ok("GET", path, None);
            pred(&v).then_some(v)
        })
        .unwrap_or_else(|| panic!("{path}: never {what}"))
    }
}

#[test]
fn a_script_onboards_pings_configures_and_revokes_through_the_api() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    let console = ConsoleProc::start(fleet.home(), None, &[]);
    let mut api = Api {
        base: console.base(),
        ca: fleet.home().join("pki").join("root-ca.crt"),
        token: None,
    };

    // The description is public and generated from the code: every call
    // the script makes below is in it.
    let doc = api.ok("GET", "/api/openapi.json", None);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    for path in [
        "/api/session",
        "/api/devices",
        "/api/devices/{id}",
        "/api/devices/{id}/commands",
        "/api/devices/{id}/settings",
        "/api/devices/{id}/revoke",
        "/api/overview",
        "/api/audit",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} documented");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    // Nothing without a token; a wrong code gets none.
    assert_eq!(api.call("GET", "/api/devices", None).0, 401);
    let (status, _) = api.call("POST", "/api/session", Some(&json!({"code": "nope"})));
    assert_eq!(status, 403);
    let code = login_code(&fleet.cli_ok(&["console", "login", "--operator", "tester"]));
    let session = api.ok("POST", "/api/session", Some(&json!({ "code": code })));
    assert_eq!(session["operator"], "tester");
    api.token = Some(session["token"].as_str().unwrap().to_owned());
    // The code was single-use.
    let anonymous = Api {
        base: api.base.clone(),
        ca: api.ca.clone(),
        token: None,
    };
    assert_eq!(
        anonymous
            .call("POST", "/api/session", Some(&json!({ "code": code })))
            .0,
        403
    );

    // Register: a bad setting registers nothing, then two devices.
    let (status, err) = api.call(
        "POST",
        "/api/devices",
        Some(&json!({"board": "qemux86-64", "ids": ["api-1"], "settings": {"telemetry_interval_s": 0}})),
    );
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("telemetry_interval_s"),
        "{err}"
    );
    assert_eq!(api.ok("GET", "/api/devices", None)["devices"], json!([]));
    let added = api.ok(
        "POST",
        "/api/devices",
        Some(
            &json!({"board": "qemux86-64", "tags": ["lab"], "ids": ["api-1", "api-2"],
                     "settings": {"log_level": "debug"}}),
        ),
    );
    assert_eq!(added[0]["registered"], true, "{added}");
    assert_eq!(added[1]["registered"], true, "{added}");

    // Download a bundle and start a real agent with it: the API shows it online.
    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("api-1.tar");
    api.download(added[0]["bundle"].as_str().unwrap(), &tar);
    let bundle = work.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    tar::Archive::new(std::fs::File::open(&tar).unwrap())
        .unpack(&bundle)
        .unwrap();
    let mut agent = fleet.spawn_agent(&fleet.agent_config(&bundle, &AgentTweaks::default()));
    let d = api.wait("/api/devices/api-1", "online", |d| d["state"] == "online");
    assert_eq!(d["tags"], json!(["lab"]));
    assert!(d["cert"]["fingerprint_sha256"].is_string(), "{d}");
    api.wait("/api/devices/api-1", "converged", |d| {
        d["converged"] == true
    });

    // Ping: queued, delivered by the fleet service, its result recorded.
    let queued = api.ok(
        "POST",
        "/api/devices/api-1/commands",
        Some(&json!({"action": "ping"})),
    );
    let command = queued[0]["command"].as_str().unwrap().to_owned();
    let d = api.wait("/api/devices/api-1", "ping succeeded", |d| {
        d["commands"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == command.as_str() && c["state"] == "succeeded")
    });
    assert!(
        d["commands"][0]["requested_by"]
            .as_str()
            .unwrap()
            .contains("tester"),
        "{d}"
    );
    // A malformed action name is refused before anything is queued.
    let (status, _) = api.call(
        "POST",
        "/api/devices/api-1/commands",
        Some(&json!({"action": "Bad Name"})),
    );
    assert_eq!(status, 400);

    // A setting: refused when the agent would refuse it, converges otherwise.
    let (status, _) = api.call(
        "POST",
        "/api/devices/api-1/settings",
        Some(&json!({"settings": {"telemetry_interval_s": 0}})),
    );
    assert_eq!(status, 400);
    let set = api.ok(
        "POST",
        "/api/devices/api-1/settings",
        Some(&json!({"settings": {"telemetry_interval_s": 2}})),
    );
    let revision = set["revision"].as_u64().unwrap();
    api.wait("/api/devices/api-1", "the new setting applied", |d| {
        d["reported"]["revision"].as_u64() == Some(revision) && d["converged"] == true
    });

    // Revoke: refused without the confirmation, done with it.
    let (status, _) = api.call(
        "POST",
        "/api/devices/api-1/revoke",
        Some(&json!({"confirm": "api-2"})),
    );
    assert_eq!(status, 400);
    let revoked = api.ok(
        "POST",
        "/api/devices/api-1/revoke",
        Some(&json!({"confirm": "api-1"})),
    );
    assert!(revoked["certificates"].as_u64().unwrap() >= 1, "{revoked}");
    assert_eq!(revoked["broker_reloaded"], true, "{revoked}");
    let list = api.ok("GET", "/api/devices?state=revoked", None);
    assert_eq!(list["devices"][0]["id"], "api-1", "{list}");
    let overview = api.ok("GET", "/api/overview", None);
    assert_eq!(overview["total"], 2);
    assert_eq!(overview["revoked"], 1);

    // The audit log has each change by this operator.
    let log = api.ok("GET", "/api/audit?limit=50", None);
    let lines: Vec<String> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{} {} {}", e["actor"], e["action"], e["target"]))
        .collect();
    for what in ["console.login", "device.add", "send", "set", "revoke"] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(what) && l.contains("operator:tester")),
            "{what} in the audit log: {lines:?}"
        );
    }

    // Logging out ends the token.
    let (status, _) = api.call("DELETE", "/api/session", None);
    assert_eq!(status, 204);
    assert_eq!(api.call("GET", "/api/devices", None).0, 401);
    agent.terminate();
}
