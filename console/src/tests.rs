//! The console's routes against a real fleet home (PKI, broker config,
//! SQLite registry) in a temporary directory, driven without TLS through
//! the router itself.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use edgebind_certs::{InitOptions, Pki};
use edgebind_fleet::ops::{self, FleetHome};
use edgebind_fleet::registry::LoginCode;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;

struct Home {
    _tmp: tempfile::TempDir,
    home: FleetHome,
}

impl Home {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let home = FleetHome::new(tmp.path());
        let pki = Pki::init(&home.pki_dir(), &InitOptions::new("console-test")).unwrap();
        pki.issue(
            &edgebind_protocol::Principal::from_cn("operator:alice").unwrap(),
            edgebind_certs::Validity::days(30),
        )
        .unwrap();
        edgebind_broker::generate(
            &home.broker_dir(),
            &pki,
            &edgebind_broker::BrokerSettings::new(vec!["broker.test".into()], vec![]),
            &edgebind_broker::GenerateOptions {
                renew_server_cert: false,
                server_cert_days: None,
            },
        )
        .unwrap();
        home.create_registry().unwrap();
        Home { _tmp: tmp, home }
    }

    fn code(&self, operator: &str) -> String {
        let mut store = self.home.open_registry().unwrap();
        ops::issue_login_code(&self.home, store.as_mut(), operator, 60)
            .unwrap()
            .code
    }
}

struct App {
    router: Router,
    console: Arc<Console>,
}

fn app(home: &Home) -> App {
    app_with(home, None)
}

fn app_with(home: &Home, images: Option<std::path::PathBuf>) -> App {
    let store = home.home.open_registry().unwrap();
    let mut config = ConsoleConfig::new(home.home.clone());
    config.images = images;
    let console = Arc::new(Console {
        config,
        store: Mutex::new(store),
        sessions: auth::Sessions::default(),
    });
    App {
        router: handlers::routes(console.clone()),
        console,
    }
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl App {
    async fn call(&self, req: Request<Body>) -> Reply {
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> Reply {
        let mut req = Request::get(path).header(header::ACCEPT, "text/html");
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        self.call(req.body(Body::empty()).unwrap()).await
    }

    async fn post(&self, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Reply {
        let mut req =
            Request::post(path).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        let body = serde_urlencoded::to_string(form).unwrap();
        self.call(req.body(Body::from(body)).unwrap()).await
    }

    /// Log in with a fresh code: the cookie header and the CSRF token.
    async fn login(&self, home: &Home) -> (String, String) {
        let r = self
            .post("/login", None, &[("code", &home.code("alice"))])
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        let set = r.headers[header::SET_COOKIE].to_str().unwrap().to_owned();
        for attr in [
            "Secure",
            "HttpOnly",
            "SameSite=Strict",
            "Max-Age=",
            "Path=/",
        ] {
            assert!(set.contains(attr), "{set} lacks {attr}");
        }
        let cookie = set.split(';').next().unwrap().to_owned();
        let page = self.get("/add", Some(&cookie)).await;
        let csrf = page
            .body
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .expect("a CSRF field on the page")
            .to_owned();
        (cookie, csrf)
    }
}

const PAGES: &[&str] = &[
    "/",
    "/devices",
    "/devices/rows",
    "/devices/dev-1",
    "/devices/dev-1/live",
    "/live/devices",
    "/live/devices/dev-1",
    "/factory",
    "/factory/claims/line-1",
    "/factory/claims/line-1/identity.tar",
    "/devices/dev-1/bundle.tar",
    "/devices/dev-1/image",
    "/add",
    "/api/devices",
    "/audit",
];
const CHANGES: &[&str] = &[
    "/devices/dev-1/send",
    "/devices/dev-1/settings",
    "/devices/dev-1/revoke",
    "/add",
    "/factory/claims",
    "/logout",
];

#[tokio::test]
async fn every_page_and_call_needs_a_session() {
    let home = Home::new();
    let app = app(&home);
    for path in PAGES {
        let html = app.get(path, None).await;
        assert_eq!(html.status, StatusCode::SEE_OTHER, "GET {path}");
        assert_eq!(html.headers[header::LOCATION], "/login");
        let api = app
            .call(Request::get(*path).body(Body::empty()).unwrap())
            .await;
        assert_eq!(api.status, StatusCode::UNAUTHORIZED, "GET {path} (no html)");
        let forged = app
            .get(path, Some(&format!("{SESSION_COOKIE}=0123456789abcdef")))
            .await;
        assert_eq!(forged.status, StatusCode::SEE_OTHER, "GET {path} forged");
    }
    for path in CHANGES {
        let r = app.post(path, None, &[("ids", "dev-9")]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "POST {path}");
    }
    // The login page and the assets are public.
    assert_eq!(app.get("/login", None).await.status, StatusCode::OK);
    assert_eq!(
        app.get("/assets/console.js", None).await.status,
        StatusCode::OK
    );
    let store = home.home.open_registry().unwrap();
    assert!(
        store
            .devices(&edgebind_fleet::registry::Selector::All)
            .unwrap()
            .is_empty(),
        "nothing was registered"
    );
}

#[tokio::test]
async fn state_changes_without_the_csrf_token_are_refused() {
    let home = Home::new();
    let app = app(&home);
    let (cookie, csrf) = app.login(&home).await;
    for path in CHANGES {
        for form in [
            vec![("board", "qemux86-64"), ("ids", "dev-9")],
            vec![
                ("board", "qemux86-64"),
                ("ids", "dev-9"),
                ("csrf", "forged"),
            ],
        ] {
            let r = app.post(path, Some(&cookie), &form).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "POST {path} {form:?}");
        }
    }
    let store = home.home.open_registry().unwrap();
    assert!(
        store
            .devices(&edgebind_fleet::registry::Selector::All)
            .unwrap()
            .is_empty()
    );
    // With the token, the same request registers the device.
    let r = app
        .post(
            "/add",
            Some(&cookie),
            &[
                ("board", "qemux86-64"),
                ("ids", "dev-9"),
                ("tags", "lab"),
                ("settings", "telemetry_interval_s=30"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("registered"), "{}", r.body);
    let d = store
        .device(&edgebind_protocol::DeviceId::new("dev-9").unwrap())
        .unwrap();
    assert_eq!(d.desired.get("telemetry_interval_s"), Some(&30.into()));
    // The header form of the token works too (scripts).
    let r = app
        .call(
            Request::post("/logout")
                .header(header::COOKIE, &cookie)
                .header("x-csrf-token", &csrf)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        app.get("/devices", Some(&cookie)).await.status,
        StatusCode::SEE_OTHER,
        "logged out"
    );
}

#[tokio::test]
async fn a_login_code_works_once_and_not_after_it_expires() {
    let home = Home::new();
    let app = app(&home);
    let code = home.code("alice");
    let ok = app.post("/login", None, &[("code", &code)]).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER);
    let again = app.post("/login", None, &[("code", &code)]).await;
    assert_eq!(again.status, StatusCode::FORBIDDEN, "a used code");
    assert!(again.headers.get(header::SET_COOKIE).is_none());
    // An expired one: stored as `console login` would, its expiry passed.
    let expired = "00112233445566778899aabbccddeeff00112233";
    home.home
        .open_registry()
        .unwrap()
        .add_login_code(&LoginCode {
            hash: ops::login::login_code_hash(expired),
            operator: "alice".into(),
            created_at: 1,
            expires_at: 2,
            used_at: None,
        })
        .unwrap();
    let r = app.post("/login", None, &[("code", expired)]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "an expired code");
    let r = app.post("/login", None, &[("code", "not-a-code")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "an unknown code");
}

#[tokio::test]
async fn an_expired_session_is_refused() {
    let home = Home::new();
    let app = app(&home);
    let (cookie, _) = app.login(&home).await;
    assert_eq!(
        app.get("/devices", Some(&cookie)).await.status,
        StatusCode::OK
    );
    app.console.sessions.expire_all();
    assert_eq!(
        app.get("/devices", Some(&cookie)).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn failed_logins_are_rate_limited() {
    let home = Home::new();
    let app = app(&home);
    for _ in 0..auth::MAX_FAILED_LOGINS {
        let r = app.post("/login", None, &[("code", "wrong")]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    }
    // Now even a good code waits.
    let r = app
        .post("/login", None, &[("code", &home.code("alice"))])
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn only_the_fleets_operators_get_a_code() {
    let home = Home::new();
    let mut store = home.home.open_registry().unwrap();
    let e = ops::issue_login_code(&home.home, store.as_mut(), "mallory", 60).unwrap_err();
    assert!(e.to_string().contains("not an operator"), "{e}");
}

#[tokio::test]
async fn added_devices_are_listed_with_their_bundle_and_bad_settings_register_nothing() {
    let home = Home::new();
    let app = app(&home);
    let (cookie, csrf) = app.login(&home).await;
    let bad = app
        .post(
            "/add",
            Some(&cookie),
            &[
                ("board", "qemux86-64"),
                ("ids", "dev-a dev-b"),
                ("settings", "telemetry_interval_s=0"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("telemetry_interval_s"), "{}", bad.body);
    let r = app
        .post(
            "/add",
            Some(&cookie),
            &[
                ("board", "qemux86-64"),
                ("ids", "dev-a\ndev-b"),
                ("tags", "lab, line-1"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let list = app.get("/devices?tag=line-1", Some(&cookie)).await;
    assert!(list.body.contains("dev-a") && list.body.contains("dev-b"));
    assert!(list.body.contains("never seen"));
    let none = app.get("/devices?state=online", Some(&cookie)).await;
    assert!(!none.body.contains("/devices/dev-a\""), "{}", none.body);
    let tar = app.get("/devices/dev-a/bundle.tar", Some(&cookie)).await;
    assert_eq!(tar.status, StatusCode::OK);
    assert!(tar.body.contains("agent.toml") && tar.body.contains("device.crt"));
    let page = app.get("/devices/dev-a", Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("Fingerprint"), "{}", page.body);
    let set = app
        .post(
            "/devices/dev-a/settings",
            Some(&cookie),
            &[("settings", "log_level=debug"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(set.status, StatusCode::SEE_OTHER);
    let page = app.get("/devices/dev-a", Some(&cookie)).await;
    assert!(page.body.contains("revision 1"), "the flash: {}", page.body);
    // Every change is in the audit log, with who did it.
    let log = home
        .home
        .open_registry()
        .unwrap()
        .audit_log(10, None)
        .unwrap();
    let lines: Vec<(String, String, String)> = log
        .iter()
        .map(|e| (e.actor.clone(), e.action.clone(), e.target.clone()))
        .collect();
    let who = "operator:alice".to_owned();
    assert_eq!(
        lines,
        [
            (who.clone(), "set".into(), "dev-a".into()),
            (who.clone(), "device.add".into(), "dev-b".into()),
            (who.clone(), "device.add".into(), "dev-a".into()),
            (who.clone(), "console.login".into(), String::new()),
        ]
    );
    let page = app.get("/audit", Some(&cookie)).await;
    assert!(page.body.contains("device.add"), "{}", page.body);
    let overview = app.get("/", Some(&cookie)).await;
    assert_eq!(overview.status, StatusCode::OK);
    assert!(overview.body.contains("2 devices"), "{}", overview.body);
    assert!(
        overview
            .body
            .contains(r#"<dd id="settings-pending">1</dd>"#),
        "{}",
        overview.body
    );
}

#[tokio::test]
async fn revoke_needs_the_id_typed_again() {
    let home = Home::new();
    let app = app(&home);
    let (cookie, csrf) = app.login(&home).await;
    let r = app
        .post(
            "/add",
            Some(&cookie),
            &[("board", "qemux86-64"), ("ids", "dev-r"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let store = home.home.open_registry().unwrap();
    let id = edgebind_protocol::DeviceId::new("dev-r").unwrap();
    let r = app
        .post(
            "/devices/dev-r/revoke",
            Some(&cookie),
            &[("confirm", "dev-x"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_ne!(
        store.device(&id).unwrap().presence_state(),
        edgebind_fleet::registry::PresenceState::Revoked
    );
    let r = app
        .post(
            "/devices/dev-r/revoke",
            Some(&cookie),
            &[("confirm", "dev-r"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(
        store.device(&id).unwrap().presence_state(),
        edgebind_fleet::registry::PresenceState::Revoked
    );
    let page = app.get("/devices/dev-r", Some(&cookie)).await;
    assert!(page.body.contains("revoked dev-r"), "{}", page.body);
    assert!(
        !page.body.contains("id=\"send\""),
        "no actions for a revoked device"
    );
}

/// The golden partition-table writer the image crate's tests share.
#[path = "../../image/tests/common/mod.rs"]
mod golden_table;

/// A 40 MiB MBR image with a 16 MiB FAT partition at 1 MiB (as the
/// factory line's tests make one), in `dir`.
fn golden(dir: &std::path::Path) -> std::path::PathBuf {
    const MIB: u64 = 1 << 20;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("golden.wic");
    let mut f = std::fs::File::create(&path).unwrap();
    f.set_len(40 * MIB).unwrap();
    golden_table::write_table(
        &mut f,
        edgebind_image::Scheme::Mbr,
        (MIB / 512, 16 * MIB / 512),
        (17 * MIB / 512, 20 * MIB / 512),
    );
    drop(f);
    let out = std::process::Command::new("mkfs.vfat")
        .args(["-n", "BOOT", "--offset", "2048"])
        .arg(&path)
        .arg((16 * 1024).to_string())
        .output()
        .expect("mkfs.vfat (dosfstools) must be installed");
    assert!(out.status.success(), "{out:?}");
    path
}

/// The identity tar on the boot partition of an image made from [`golden`].
fn tar_on_image(image: &std::path::Path) -> Vec<u8> {
    let slice =
        fscommon::StreamSlice::new(std::fs::File::open(image).unwrap(), 1 << 20, 17 << 20).unwrap();
    let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).unwrap();
    let mut on_image = Vec::new();
    std::io::Read::read_to_end(
        &mut fs
            .root_dir()
            .open_file(edgebind_protocol::bundle::IDENTITY_TAR_ON_BOOT)
            .unwrap(),
        &mut on_image,
    )
    .unwrap();
    on_image
}

/// A file of a tar, as text.
fn file_in_tar(tar: &[u8], name: &str) -> String {
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some(name) {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
            return text;
        }
    }
    panic!("no {name} in the tar")
}

#[tokio::test]
async fn a_personalized_image_carries_the_devices_bundle_and_downloads() {
    let home = Home::new();
    let images = home.home.root().join("golden");
    let golden = golden(&images);
    let before = std::fs::read(&golden).unwrap();
    let app = app_with(&home, Some(images));
    let (cookie, csrf) = app.login(&home).await;
    let form = app.get("/add", Some(&cookie)).await;
    assert!(
        form.body.contains("golden.wic"),
        "the golden image is offered"
    );
    let unknown = app
        .post(
            "/add",
            Some(&cookie),
            &[
                ("board", "qemux86-64"),
                ("ids", "dev-i"),
                ("image", "../x.wic"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(
        unknown.status,
        StatusCode::BAD_REQUEST,
        "only images in --images"
    );
    let r = app
        .post(
            "/add",
            Some(&cookie),
            &[
                ("board", "qemux86-64"),
                ("ids", "dev-i"),
                ("image", "golden.wic"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert!(r.body.contains("personalized image made"), "{}", r.body);
    let img = app.get("/devices/dev-i/image", Some(&cookie)).await;
    assert_eq!(img.status, StatusCode::OK);
    assert_eq!(
        img.headers[header::CONTENT_LENGTH],
        (40u64 << 20).to_string()
    );
    assert_eq!(
        std::fs::read(&golden).unwrap(),
        before,
        "the golden image is never written"
    );
    // The image's boot partition holds exactly the device's bundle tar.
    let on_image = tar_on_image(&home.home.root().join("console/images/dev-i.img"));
    let bundle = edgebind_certs::bundle::tar_path_for(
        &home
            .home
            .bundle_dir(&edgebind_protocol::DeviceId::new("dev-i").unwrap()),
    );
    assert_eq!(on_image, std::fs::read(bundle).unwrap());
}

#[tokio::test]
async fn a_factory_batch_gives_each_unit_its_own_image_and_record() {
    let home = Home::new();
    let images = home.home.root().join("golden");
    let golden = golden(&images);
    let before = std::fs::read(&golden).unwrap();
    let app = app_with(&home, Some(images));
    let (cookie, csrf) = app.login(&home).await;
    let page = app.get("/factory", Some(&cookie)).await;
    assert!(
        page.body.contains("batch-form") && page.body.contains("golden.wic"),
        "{}",
        page.body
    );
    let batch = |serials: &'static str, image: &'static str| {
        let csrf = csrf.clone();
        let (app, cookie) = (&app, &cookie);
        async move {
            app.post(
                "/factory/batches",
                Some(cookie),
                &[
                    ("board", "qemux86-64"),
                    ("tags", "line-7"),
                    ("serials", serials),
                    ("image", image),
                    ("csrf", &csrf),
                ],
            )
            .await
        }
    };
    // Refused before anything is made: two serials naming one device, a
    // golden image not in --images.
    let twice = batch("ACME-1\nacme-1", "golden.wic").await;
    assert_eq!(twice.status, StatusCode::BAD_REQUEST);
    assert!(
        twice.body.contains("would both be device acme-1"),
        "{}",
        twice.body
    );
    let outside = batch("ACME-1", "../golden.wic").await;
    assert_eq!(outside.status, StatusCode::BAD_REQUEST);
    let store = home.home.open_registry().unwrap();
    assert!(
        store
            .list_devices(&Default::default())
            .unwrap()
            .devices
            .is_empty()
    );

    let made = batch("ACME-1\nACME-2", "golden.wic").await;
    assert_eq!(made.status, StatusCode::OK, "{}", made.body);
    assert!(
        made.body.contains("2 made, 0 already made"),
        "{}",
        made.body
    );
    let sha = ops::factory::sha256_file(&golden).unwrap();
    for (serial, id) in [("ACME-1", "acme-1"), ("ACME-2", "acme-2")] {
        assert!(
            made.body.contains(&format!("href=\"/devices/{id}/image\"")),
            "{}",
            made.body
        );
        let d = store.device(&id.parse().unwrap()).unwrap();
        assert!(d.tags.iter().any(|t| t.as_str() == "line-7"), "{d:?}");
        let record = store
            .manufacturing_record(serial)
            .unwrap()
            .expect("a record");
        assert_eq!(record.device.as_str(), id);
        assert_eq!(record.station, "console");
        assert_eq!(record.operator, "operator:alice");
        assert_eq!(record.image_sha256.as_deref(), Some(sha.as_str()));
        // Its own image, downloadable, with its own identity on the boot
        // partition.
        let img = app
            .get(&format!("/devices/{id}/image"), Some(&cookie))
            .await;
        assert_eq!(img.status, StatusCode::OK);
        assert_eq!(
            img.headers[header::CONTENT_LENGTH],
            (40u64 << 20).to_string()
        );
        let tar = tar_on_image(&home.home.root().join(format!("console/images/{id}.img")));
        let toml = file_in_tar(&tar, "agent.toml");
        assert!(toml.contains(&format!("\"{id}\"")), "{toml}");
        let cert = file_in_tar(&tar, "device.crt");
        let der = rustls_pemfile::certs(&mut cert.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let fp: String = ring::digest::digest(&ring::digest::SHA256, &der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            fp, record.cert_fingerprint_sha256,
            "{id}: the record's certificate"
        );
    }
    assert_eq!(
        std::fs::read(&golden).unwrap(),
        before,
        "the golden image is never written"
    );
    // The same batch again issues nothing: each serial is already made.
    let again = batch("ACME-1\nACME-2", "golden.wic").await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert!(
        again.body.contains("0 made, 2 already made"),
        "{}",
        again.body
    );
    let factory = app.get("/factory", Some(&cookie)).await;
    assert!(
        factory.body.contains("Manufacturing records (2)"),
        "{}",
        factory.body
    );
    let log = store.audit_log(10, None).unwrap();
    assert!(log.iter().any(|e| e.action == "factory.run"), "{log:?}");
}

#[tokio::test]
async fn a_claim_batch_image_carries_the_batchs_claim_bundle() {
    let home = Home::new();
    let images = home.home.root().join("golden");
    let golden = golden(&images);
    let app = app_with(&home, Some(images));
    let (cookie, csrf) = app.login(&home).await;
    let make = |batch: &'static str| {
        let csrf = csrf.clone();
        let (app, cookie) = (&app, &cookie);
        async move {
            app.post(
                &format!("/factory/claims/{batch}/image"),
                Some(cookie),
                &[("image", "golden.wic"), ("csrf", &csrf)],
            )
            .await
        }
    };
    let unknown = make("line-9").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.body);
    let r = app
        .post(
            "/factory/claims",
            Some(&cookie),
            &[
                ("batch", "line-7"),
                ("serials", "SN-1\nSN-2"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let image = home.home.root().join("console/claims/line-7.img");
    // Without a provisioning listener the units could not claim: refused
    // with what to do, and no image.
    let refused = make("line-7").await;
    assert!(
        refused.body.contains("provisioning-port"),
        "{}",
        refused.body
    );
    assert!(!image.exists());

    let broker = home.home.broker_dir();
    let mut settings = edgebind_broker::BrokerSettings::load(&broker).unwrap();
    settings.provisioning_port = Some(8884);
    settings.save(&broker).unwrap();
    let page = app.get("/factory/claims/line-7", Some(&cookie)).await;
    assert!(page.body.contains("claim-image-form"), "{}", page.body);
    let r = make("line-7").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let page = app.get("/factory/claims/line-7", Some(&cookie)).await;
    assert!(
        page.body.contains("claim image of batch line-7 made"),
        "{}",
        page.body
    );
    assert!(page.body.contains("id=\"claim-image\""), "{}", page.body);
    let img = app.get("/factory/claims/line-7/image", Some(&cookie)).await;
    assert_eq!(img.status, StatusCode::OK);
    assert_eq!(
        img.headers[header::CONTENT_LENGTH],
        (40u64 << 20).to_string()
    );
    // The boot partition holds the batch's claim bundle: the claim
    // certificate and a [claim] agent.toml with the provisioning port.
    let tar = tar_on_image(&image);
    assert_eq!(
        tar,
        std::fs::read(home.home.root().join("console/claims/line-7.bundle.tar")).unwrap()
    );
    let toml = file_in_tar(&tar, "agent.toml");
    assert!(toml.contains("[claim]") && toml.contains("8884"), "{toml}");
    assert_eq!(std::fs::read(&golden).unwrap().len(), 40 << 20);
    // Made again: a new claim certificate replaces the bundle.
    let first = file_in_tar(&tar, "claim.crt");
    assert_eq!(make("line-7").await.status, StatusCode::SEE_OTHER);
    assert_ne!(file_in_tar(&tar_on_image(&image), "claim.crt"), first);
    let log = home
        .home
        .open_registry()
        .unwrap()
        .audit_log(10, None)
        .unwrap();
    assert!(
        log.iter().any(|e| e.action == "factory.claim-image"),
        "{log:?}"
    );
}

/// A device in the registry, as `fleet serve` would know it.
fn add_device(home: &Home, id: &str) {
    let mut store = home.home.open_registry().unwrap();
    store
        .add_device(&edgebind_fleet::registry::NewDevice {
            id: id.parse().unwrap(),
            board: "raspberrypi3-64".parse().unwrap(),
            tags: Default::default(),
            cert: None,
        })
        .unwrap();
}

fn status(home: &Home, id: &str, state: edgebind_protocol::messages::Presence) {
    use edgebind_fleet::registry::Update;
    use edgebind_protocol::messages::Status;
    let now = edgebind_protocol::messages::now_unix();
    let status = match state {
        edgebind_protocol::messages::Presence::Online => Status {
            state,
            session: Some("s1".into()),
            agent_version: Some("0.1.0".into()),
            boot_id: Some("b1".into()),
            uptime_s: Some(5),
            addresses: vec![],
            ts: Some(now),
        },
        _ => Status::offline(),
    };
    let mut store = home.home.open_registry().unwrap();
    store
        .apply(&[Update::Status {
            device: id.parse().unwrap(),
            status,
            received_at: now,
        }])
        .unwrap();
}

/// The server-sent events of one live stream, read as they arrive.
struct Events(Body);

impl Events {
    async fn open(app: &App, path: &str, cookie: &str) -> Events {
        let req = Request::get(path)
            .header(header::ACCEPT, "text/event-stream")
            .header(header::COOKIE, cookie)
            .body(Body::empty())
            .unwrap();
        let res = app.router.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "GET {path}");
        assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
        Events(res.into_body())
    }

    /// The next event's text (its `event:` and `data:` lines); None when
    /// the stream ended.
    async fn next(&mut self) -> Option<String> {
        let mut text = String::new();
        loop {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), self.0.frame())
                .await
                .expect("an event within 10 s");
            let Some(frame) = frame else {
                return (!text.is_empty()).then_some(text);
            };
            if let Ok(data) = frame.unwrap().into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
                if text.ends_with("\n\n") {
                    return Some(text);
                }
            }
        }
    }

    /// Events until one contains `want`.
    async fn until(&mut self, want: &str) -> String {
        loop {
            let e = self
                .next()
                .await
                .unwrap_or_else(|| panic!("stream ended before {want:?}"));
            if e.contains(want) {
                return e;
            }
        }
    }
}

#[tokio::test]
async fn the_device_list_streams_presence_changes_and_ends_with_the_session() {
    use edgebind_protocol::messages::Presence;
    let home = Home::new();
    add_device(&home, "dev-1");
    add_device(&home, "dev-2");
    let app = app(&home);
    let (cookie, _) = app.login(&home).await;
    let mut events = Events::open(&app, "/live/devices?q=dev", &cookie).await;
    let first = events.next().await.unwrap();
    assert!(first.starts_with("event: update"), "{first}");
    assert!(first.contains("device-list"), "{first}");
    assert!(first.contains("never seen"), "{first}");

    // The fleet service records dev-1 online: the stream sends the new rows
    // without being asked again.
    status(&home, "dev-1", Presence::Online);
    let update = events.until("badge online").await;
    assert!(update.contains(r#"data-device=\"dev-1\""#), "{update}");

    // A will of a device never seen changes no row: no event; the next one
    // is dev-1 going offline.
    status(&home, "dev-2", Presence::Offline);
    status(&home, "dev-1", Presence::Offline);
    let update = events.next().await.unwrap();
    assert!(update.contains("badge offline"), "{update}");
    assert!(!update.contains("badge online"), "{update}");
    assert!(update.contains("never seen"), "dev-2 unchanged: {update}");

    // The session expires: the stream says so and ends.
    app.console.sessions.expire_all();
    let last = events.until("event: expired").await;
    assert!(!last.contains("update"), "{last}");
    assert_eq!(events.next().await, None, "the stream ended");
}

#[tokio::test]
async fn a_device_page_streams_its_commands_and_settings() {
    let home = Home::new();
    add_device(&home, "dev-1");
    let app = app(&home);
    let (cookie, _) = app.login(&home).await;
    let mut events = Events::open(&app, "/live/devices/dev-1", &cookie).await;
    let first = events.next().await.unwrap();
    assert!(
        first.contains(r#""live":"#) && first.contains(r#""commands":"#),
        "{first}"
    );

    let mut store = home.home.open_registry().unwrap();
    let changes = serde_json::json!({"log_level": "debug"});
    ops::set(
        store.as_mut(),
        &"dev-1".parse().unwrap(),
        changes.as_object().unwrap(),
    )
    .unwrap();
    events.until("log_level").await;

    // An unknown device is refused once, not streamed.
    let missing = app
        .call(
            Request::get("/live/devices/dev-9")
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[test]
fn a_slow_render_slows_its_stream_down() {
    use std::time::Duration;
    assert_eq!(
        live::next_interval(Duration::from_millis(1)),
        live::MIN_INTERVAL
    );
    assert_eq!(
        live::next_interval(Duration::from_millis(50)),
        Duration::from_millis(500)
    );
}

impl App {
    /// A bearer token from `POST /api/session`.
    async fn api_token(&self, home: &Home) -> String {
        let r = self
            .call(
                Request::post("/api/session")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(
                        serde_json::json!({"code": home.code("alice")}).to_string(),
                    ))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        v["token"].as_str().unwrap().to_owned()
    }

    async fn api(&self, method: &str, path: &str, auth: &str, body: serde_json::Value) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(cookie) = auth.strip_prefix("cookie:") {
            req = req.header(header::COOKIE, cookie);
        } else {
            req = req.header(header::AUTHORIZATION, format!("Bearer {auth}"));
        }
        self.call(req.body(Body::from(body.to_string())).unwrap())
            .await
    }
}

#[tokio::test]
async fn a_bearer_token_needs_no_csrf_but_works_only_as_a_bearer_token() {
    let home = Home::new();
    let app = app(&home);
    let token = app.api_token(&home).await;
    let add = serde_json::json!({"board": "raspberrypi3-64", "ids": ["dev-1"]});
    let r = app.api("POST", "/api/devices", &token, add.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains(r#""registered":true"#), "{}", r.body);

    // The token as a cookie is no session (a browser would send that by itself).
    let as_cookie = format!("cookie:{SESSION_COOKIE}={token}");
    let r = app
        .api("GET", "/api/devices", &as_cookie, serde_json::json!({}))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A browser session's cookie is no bearer token, and with the cookie a
    // change still needs the CSRF token.
    let (cookie, csrf) = app.login(&home).await;
    let cookie_token = cookie.split_once('=').unwrap().1;
    let r = app
        .api("GET", "/api/devices", cookie_token, serde_json::json!({}))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let add2 = serde_json::json!({"board": "raspberrypi3-64", "ids": ["dev-2"]});
    let r = app
        .api(
            "POST",
            "/api/devices",
            &format!("cookie:{cookie}"),
            add2.clone(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "no CSRF token");
    let r = app
        .call(
            Request::post("/api/devices")
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::COOKIE, &cookie)
                .header("x-csrf-token", &csrf)
                .body(Body::from(add2.to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // Errors are JSON; an expired token is refused.
    let r = app
        .api("GET", "/api/devices/dev-9", &token, serde_json::json!({}))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.body.starts_with(r#"{"error":"#), "{}", r.body);
    app.console.sessions.expire_all();
    let r = app
        .api("GET", "/api/devices", &token, serde_json::json!({}))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_session_of_one_fleet_home_reaches_nothing_of_another() {
    let (home_a, home_b) = (Home::new(), Home::new());
    add_device(&home_a, "only-in-a");
    add_device(&home_b, "only-in-b");
    let (app_a, app_b) = (app(&home_a), app(&home_b));
    let token_a = app_a.api_token(&home_a).await;
    let (cookie_a, _) = app_a.login(&home_a).await;

    // Console A shows A's devices only.
    let r = app_a
        .api("GET", "/api/devices", &token_a, serde_json::json!({}))
        .await;
    assert!(
        r.body.contains("only-in-a") && !r.body.contains("only-in-b"),
        "{}",
        r.body
    );
    // A's token and cookie mean nothing to console B, on any page or call.
    for path in [
        "/api/devices",
        "/api/devices/only-in-b",
        "/devices",
        "/live/devices",
    ] {
        let r = app_b
            .api("GET", path, &token_a, serde_json::json!({}))
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path} by token");
        let r = app_b.get(path, Some(&cookie_a)).await;
        assert_ne!(r.status, StatusCode::OK, "{path} by cookie");
        assert!(!r.body.contains("only-in-b"), "{path}: {}", r.body);
    }
    // A login code of home A does not open console B.
    let code_a = home_a.code("alice");
    let r = app_b.post("/login", None, &[("code", &code_a)]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_openapi_description_is_served_and_lists_every_api_route() {
    let home = Home::new();
    let app = app(&home);
    let r = app
        .call(Request::get(OPENAPI_PATH).body(Body::empty()).unwrap())
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in [
        ("post", "/api/session"),
        ("delete", "/api/session"),
        ("get", "/api/devices"),
        ("post", "/api/devices"),
        ("get", "/api/devices/{id}"),
        ("post", "/api/devices/{id}/commands"),
        ("post", "/api/devices/{id}/settings"),
        ("post", "/api/devices/{id}/revoke"),
        ("get", "/api/overview"),
        ("get", "/api/audit"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path}"
        );
    }
    // Every documented route answers (not 404/405) when called without a session.
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let uri = path.replace("{id}", "dev-1");
            let r = app
                .call(
                    Request::builder()
                        .method(method.to_uppercase().as_str())
                        .uri(&uri)
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Body::from("{}"))
                        .unwrap(),
                )
                .await;
            assert!(
                !matches!(
                    r.status,
                    StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
                ),
                "{method} {uri}: {}",
                r.status
            );
        }
    }
}

#[tokio::test]
async fn a_claim_batch_puts_serials_on_its_allow_list_and_issues_its_identity() {
    let home = Home::new();
    let app = app(&home);
    let (cookie, csrf) = app.login(&home).await;

    // A bad serial or batch name allows nothing.
    for (batch, serials) in [
        ("line-1", "SN-1 bad/serial"),
        ("Line 1", "SN-1"),
        ("line-1", "SN-1 SN-1"),
    ] {
        let r = app
            .post(
                "/factory/claims",
                Some(&cookie),
                &[("csrf", &csrf), ("batch", batch), ("serials", serials)],
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{batch} {serials}");
        assert!(r.body.contains("role=\"alert\""), "{}", r.body);
    }
    let store = home.home.open_registry().unwrap();
    let batch: edgebind_protocol::DeviceId = "line-1".parse().unwrap();
    assert!(store.claim_serials(&batch).unwrap().is_empty());

    let r = app
        .post(
            "/factory/claims",
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("batch", "line-1"),
                ("serials", "SN-1\nSN-2, SN-3"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.headers[header::LOCATION], "/factory/claims/line-1");
    let serials: Vec<String> = store
        .claim_serials(&batch)
        .unwrap()
        .iter()
        .map(|s| s.serial.to_string())
        .collect();
    assert_eq!(serials, ["SN-1", "SN-2", "SN-3"]);
    let page = app.get("/factory/claims/line-1", Some(&cookie)).await;
    assert!(page.body.contains("3 serial(s) added"), "{}", page.body);
    assert!(page.body.contains("SN-2"), "{}", page.body);

    // Again with one more: only that one is new.
    app.post(
        "/factory/claims",
        Some(&cookie),
        &[
            ("csrf", &csrf),
            ("batch", "line-1"),
            ("serials", "SN-3 SN-4"),
        ],
    )
    .await;
    let page = app.get("/factory/claims/line-1", Some(&cookie)).await;
    assert!(
        page.body
            .contains("1 serial(s) added to the allow-list, 1 already"),
        "{}",
        page.body
    );

    // The claim identity downloads as a tar whose certificate is claim:line-1.
    let r = app
        .call(
            Request::get("/factory/claims/line-1/identity.tar")
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let dir = home
        .home
        .identity_dir(&edgebind_protocol::Principal::Claim(batch.clone()));
    assert_eq!(
        ops::identity::identity_cn(&dir).as_deref(),
        Some("claim:line-1")
    );
    let log = store.audit_log(10, None).unwrap();
    assert!(
        log.iter()
            .any(|e| e.action == "factory.allow" && e.target == "claim:line-1")
    );
    // The factory page lists the (empty) records and the form.
    let page = app.get("/factory", Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("No unit made yet"), "{}", page.body);
}
