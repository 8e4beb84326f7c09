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

/// A 40 MiB MBR image with a 16 MiB FAT partition at 1 MiB (as the
/// factory line's tests make one), in `dir`.
fn golden(dir: &std::path::Path) -> std::path::PathBuf {
    const MIB: u64 = 1 << 20;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("golden.wic");
    let mut f = std::fs::File::create(&path).unwrap();
    f.set_len(40 * MIB).unwrap();
    let mut mbr = mbrman::MBR::new_from(&mut f, 512, [1, 2, 3, 4]).unwrap();
    mbr[1] = mbrman::MBRPartitionEntry {
        boot: mbrman::BOOT_INACTIVE,
        first_chs: mbrman::CHS::empty(),
        sys: 0x0c,
        last_chs: mbrman::CHS::empty(),
        starting_lba: (MIB / 512) as u32,
        sectors: (16 * MIB / 512) as u32,
    };
    mbr.write_into(&mut f).unwrap();
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
    let made = home.home.root().join("console/images/dev-i.img");
    let slice =
        fscommon::StreamSlice::new(std::fs::File::open(&made).unwrap(), 1 << 20, 17 << 20).unwrap();
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
    let bundle = edgebind_certs::bundle::tar_path_for(
        &home
            .home
            .bundle_dir(&edgebind_protocol::DeviceId::new("dev-i").unwrap()),
    );
    assert_eq!(on_image, std::fs::read(bundle).unwrap());
}
