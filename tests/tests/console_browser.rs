//! The web console in a real browser: headless Chromium (Debian's
//! `chromium`, `chromium-driver`) over WebDriver, against `edgebind console`
//! on a fleet home with a real Mosquitto, the fleet service and a real
//! agent. Everything listens on 127.0.0.1. A missing Chromium or
//! chromedriver fails the test (scripts/setup installs them).

mod fleet_support;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgebind_tests::console::{Browser, ConsoleProc};
use edgebind_tests::wait_for;
use fantoccini::{Client, Locator};
use fleet_support::{AgentTweaks, Fleet, LONG};
use serde_json::json;

/// The console's certificate chains to the fleet's root CA: a TLS handshake
/// that trusts only that CA succeeds.
fn assert_served_with_fleet_ca(addr: SocketAddr, root_ca: &Path) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(root_ca).unwrap();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .expect("handshake trusting only the fleet CA");
    }
}

fn stage(what: &str) {
    eprintln!(
        "console_browser: {what} ({:?})",
        std::time::SystemTime::now()
    );
}

async fn screenshot(c: &Client, name: &str) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = c.screenshot().await.unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

async fn type_into(c: &Client, css: &str, text: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .send_keys(text)
        .await
        .unwrap();
}

/// Mark the page; [`still_same_page`] proves it was not reloaded since.
async fn mark_page(c: &Client) {
    c.execute("window.__notReloaded = 1; return 1;", vec![])
        .await
        .unwrap();
}

async fn still_same_page(c: &Client) {
    let same = c
        .execute("return window.__notReloaded === 1;", vec![])
        .await
        .unwrap();
    assert_eq!(same, json!(true), "the page was reloaded");
}

/// Wait for the downloaded `name` in `dir` (complete: no `.crdownload`).
fn downloaded(dir: &Path, name: &str) -> PathBuf {
    let file = dir.join(name);
    wait_for(LONG, || {
        let partial = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".crdownload"));
        (file.is_file() && !partial).then_some(())
    })
    .unwrap_or_else(|| panic!("{name} was not downloaded into {}", dir.display()));
    file
}

fn unpack(tar: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    tar::Archive::new(std::fs::File::open(tar).unwrap())
        .unpack(into)
        .unwrap();
    for f in ["agent.toml", "device.crt", "device.key", "ca.crt"] {
        assert!(into.join(f).is_file(), "{f} in the downloaded bundle");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_onboards_devices_in_the_browser_and_watches_them_live() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    let console = ConsoleProc::start(fleet.home(), None, &[]);
    let addr = console.addr;
    assert_served_with_fleet_ca(addr, &fleet.home().join("pki").join("root-ca.crt"));

    let work = tempfile::tempdir().unwrap();
    let downloads = work.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let browser = Browser::start(&downloads, &work.path().join("profile"), 1280, 900).await;
    let c = &browser.client;
    let base = console.base();

    // Without a session, every page leads to the login page.
    c.goto(&format!("{base}/devices")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/login"));

    // Log in with a single-use code from the fleet home.
    let out = fleet.cli_ok(&["console", "login", "--operator", "tester", "--url", &base]);
    let url = out
        .lines()
        .find_map(|l| l.strip_prefix("open: "))
        .expect("a login URL")
        .to_owned();
    c.goto(&url).await.unwrap();
    screenshot(c, "login.png").await;
    click(c, "button[type=submit]").await;
    browser.wait_text("h1", "Devices", LONG).await;
    stage("logged in");
    // The code is used up: the same link no longer logs in.
    c.goto(&url).await.unwrap();
    click(c, "button[type=submit]").await;
    browser.wait_text("[role=alert]", "refused", LONG).await;
    let nobody = fleet.cli(&["console", "login", "--operator", "nobody"]);
    assert!(
        !nobody.status.success(),
        "only the fleet's operators get a code"
    );
    let out = fleet.cli_ok(&["console", "login", "--operator", "tester"]);
    browser
        .log_in(&base, &edgebind_tests::console::login_code(&out))
        .await;

    // Add two devices: board, tags, initial settings, their ids.
    c.goto(&format!("{base}/add")).await.unwrap();
    type_into(c, "#ids", "web-1\nweb-2").await;
    type_into(c, "#tags", "lab").await;
    type_into(c, "#settings", "log_level=debug").await;
    screenshot(c, "add.png").await;
    click(c, "#register").await;
    let result = browser.wait_text("#added", "registered", LONG).await;
    stage("registered");
    assert!(
        result.contains("web-1") && result.contains("web-2"),
        "{result}"
    );

    // Download their identity bundles through the browser.
    click(c, "tr[data-added=web-1] a.bundle").await;
    let tar1 = downloaded(&downloads, "web-1.tar");
    click(c, "tr[data-added=web-2] a.bundle").await;
    let tar2 = downloaded(&downloads, "web-2.tar");
    stage("bundles downloaded");
    let (bundle1, bundle2) = (work.path().join("bundle-1"), work.path().join("bundle-2"));
    unpack(&tar1, &bundle1);
    unpack(&tar2, &bundle2);

    // The list shows them, never seen; the registry has the initial settings.
    c.goto(&format!("{base}/devices")).await.unwrap();
    browser
        .wait_text("tr[data-device=web-1]", "never seen", LONG)
        .await;
    let d = fleet.store().device(&"web-1".parse().unwrap()).unwrap();
    assert_eq!(d.desired.get("log_level"), Some(&json!("debug")));

    // Real agents with the downloaded bundles: the rows turn online without
    // a reload (server-sent events).
    mark_page(c).await;
    let mut agent1 = fleet.spawn_agent(&fleet.agent_config(&bundle1, &AgentTweaks::default()));
    let started = Instant::now();
    let mut agent2 = fleet.spawn_agent(&fleet.agent_config(&bundle2, &AgentTweaks::default()));
    stage("agents started");
    let row = browser
        .wait_text("tr[data-device=web-1]", "online", LONG)
        .await;
    eprintln!("row online after {:?}: {row}", started.elapsed());
    browser
        .wait_text("tr[data-device=web-2]", "online", LONG)
        .await;
    still_same_page(c).await;
    screenshot(c, "devices.png").await;

    // The device page: a chart of its telemetry; ping, and the result
    // appears under Commands without a reload.
    fleet.wait_device("web-1", LONG, "telemetry", |d| d.telemetry_count >= 2);
    c.goto(&format!("{base}/devices/web-1")).await.unwrap();
    browser.wait_text("#state", "online", LONG).await;
    c.find(Locator::Css("#telemetry-chart polyline"))
        .await
        .expect("the telemetry chart");
    click(c, "#action option[value=ping]").await;
    click(c, "#send").await;
    browser.wait_text(".notice", "ping queued", LONG).await;
    mark_page(c).await;
    let commands = browser
        .try_wait_text("#commands", "succeeded", LONG)
        .await
        .unwrap_or_else(|last| panic!("no ping result: {last}\nagent log:\n{}", agent1.log()));
    assert!(commands.contains("ping"), "{commands}");
    still_same_page(c).await;
    // The initial settings converged: the agent applied log_level.
    browser.wait_text("#live", "· converged", LONG).await;
    stage("pinged, converged");

    // Change a setting: it converges live (desired revision 2 reported).
    type_into(c, "#settings-input", "telemetry_interval_s=2").await;
    click(c, "#set").await;
    browser.wait_text(".notice", "revision 2", LONG).await;
    mark_page(c).await;
    browser.wait_text("#live", "reported 2", LONG).await;
    let live = browser.wait_text("#live", "· converged", LONG).await;
    assert!(live.contains("telemetry_interval_s"), "{live}");
    still_same_page(c).await;
    screenshot(c, "device.png").await;
    stage("setting converged");

    // A bad setting is refused with the agent's own rule, and nothing changes.
    type_into(c, "#settings-input", "telemetry_interval_s=0").await;
    click(c, "#set").await;
    browser
        .wait_text("[role=alert]", "telemetry_interval_s", LONG)
        .await;
    let d = fleet.store().device(&"web-1".parse().unwrap()).unwrap();
    assert_eq!(d.desired_revision, 2, "the refused setting changed nothing");
    c.goto(&format!("{base}/devices/web-1")).await.unwrap();

    // Revoke, confirmed twice (the id typed, then the dialog): marked
    // revoked, and web-2 stays online.
    type_into(c, "#confirm", "web-1").await;
    click(c, "#revoke").await;
    c.accept_alert().await.expect("the confirmation dialog");
    browser.wait_text(".notice", "revoked web-1", LONG).await;
    browser.wait_text("#state", "revoked", LONG).await;
    assert!(
        c.find(Locator::Css("#send")).await.is_err(),
        "no actions for a revoked device"
    );
    stage("revoked");
    c.goto(&format!("{base}/devices")).await.unwrap();
    browser
        .wait_text("tr[data-device=web-1]", "revoked", LONG)
        .await;
    // The revoked agent is cut off; the other keeps sending telemetry.
    let before = fleet
        .store()
        .device(&"web-2".parse().unwrap())
        .unwrap()
        .telemetry_count;
    fleet.wait_device("web-2", LONG, "more telemetry", |d| {
        d.telemetry_count >= before + 2
    });
    browser
        .wait_text("tr[data-device=web-2]", "online", LONG)
        .await;

    // The audit log names the operator for each change.
    c.goto(&format!("{base}/audit")).await.unwrap();
    let log = browser.wait_text("#audit", "revoke", LONG).await;
    for what in ["console.login", "device.add", "send", "set", "revoke"] {
        assert!(log.contains(what), "{what} in the audit log: {log}");
    }
    assert!(log.contains("operator:tester"), "{log}");
    screenshot(c, "audit.png").await;

    // Overview, and the device list at a tablet's width.
    c.goto(&format!("{base}/")).await.unwrap();
    browser.wait_text("#overview", "devices", LONG).await;
    screenshot(c, "overview.png").await;
    c.set_window_size(820, 1100).await.unwrap();
    c.goto(&format!("{base}/devices")).await.unwrap();
    browser
        .wait_text("tr[data-device=web-2]", "online", LONG)
        .await;
    screenshot(c, "devices-tablet.png").await;

    browser.client.clone().close().await.unwrap();
    agent1.terminate();
    agent2.terminate();
}

/// The console's session cookie (`edgebind_console::SESSION_COOKIE`).
const SESSION_COOKIE: &str = "__Host-edgebind_session";

async fn on_login_page(c: &Client) -> bool {
    c.current_url().await.unwrap().path() == "/login"
}

/// Change the CSRF field of the form holding `css` (`None`: remove it).
async fn forge_csrf(c: &Client, css: &str, value: Option<&str>) {
    let script = "const f = document.querySelector(arguments[0]).form; \
                  const t = f.querySelector('input[name=csrf]'); \
                  if (arguments[1] === null) { t.remove(); } else { t.value = arguments[1]; } \
                  return f.querySelectorAll('input[name=csrf]').length;";
    c.execute(script, vec![json!(css), json!(value)])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_is_refused_an_expired_session_forged_forms_and_another_homes_data() {
    let home_a = Fleet::start();
    let home_b = Fleet::start();
    home_a.add_device("a-dev", &[]);
    home_b.add_device("b-dev", &[]);
    // Sessions of home A last one minute (the shortest), home B's the default.
    let console_a = ConsoleProc::start(home_a.home(), None, &["--session-minutes", "1"]);
    let console_b = ConsoleProc::start(home_b.home(), None, &[]);
    let (a, b) = (console_a.base(), console_b.base());
    let (ca_a, ca_b) = (
        home_a.home().join("pki").join("root-ca.crt"),
        home_b.home().join("pki").join("root-ca.crt"),
    );

    let work = tempfile::tempdir().unwrap();
    let downloads = work.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let browser = Browser::start(&downloads, &work.path().join("profile"), 1280, 900).await;
    let c = &browser.client;

    // Home A: the session expires with the device list open. Its live stream
    // says so and the page goes to the login page by itself.
    let out = home_a.cli_ok(&["console", "login", "--operator", "tester"]);
    let logged_in = Instant::now();
    browser
        .log_in(&a, &edgebind_tests::console::login_code(&out))
        .await;
    let session_a = c
        .get_named_cookie(SESSION_COOKIE)
        .await
        .expect("home A's session cookie");
    let cookie_a = format!("{SESSION_COOKIE}={}", session_a.value());
    assert_eq!(
        curl_status(&format!("{a}/devices/a-dev/bundle.tar"), &ca_a, &cookie_a),
        200,
        "a bundle with the live session"
    );
    browser
        .wait_text("tr[data-device=a-dev]", "never seen", LONG)
        .await;
    stage("logged in to home A");
    let deadline = logged_in + Duration::from_secs(60) + LONG;
    while !on_login_page(c).await {
        assert!(
            Instant::now() < deadline,
            "the page never left for the login page"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        logged_in.elapsed() >= Duration::from_secs(59),
        "not before the session's end: {:?}",
        logged_in.elapsed()
    );
    // The browser dropped the cookie with its Max-Age; the console itself
    // refuses the expired session too: the old cookie sent again (by curl:
    // WebDriver cannot set a `__Host-` cookie) opens no page and no bundle.
    assert_eq!(
        curl_status(&format!("{a}/devices/a-dev/bundle.tar"), &ca_a, &cookie_a),
        401,
        "a bundle with the expired session"
    );
    assert_eq!(
        curl_status(&format!("{a}/devices"), &ca_a, &cookie_a),
        401,
        "the device list with the expired session"
    );
    stage("expired session refused");

    // Home B: a settings form without its CSRF token, then with a wrong one:
    // refused, nothing set.
    let out = home_b.cli_ok(&["console", "login", "--operator", "tester"]);
    browser
        .log_in(&b, &edgebind_tests::console::login_code(&out))
        .await;
    let b_dev = || home_b.store().device(&"b-dev".parse().unwrap()).unwrap();
    let wrong = "0".repeat(64);
    for forged in [None, Some(wrong.as_str())] {
        c.goto(&format!("{b}/devices/b-dev")).await.unwrap();
        type_into(c, "#settings-input", "log_level=debug").await;
        forge_csrf(c, "#settings-input", forged).await;
        click(c, "#set").await;
        let text = wait_for_page_text(&browser, "CSRF").await;
        assert!(text.contains("refused"), "{forged:?}: {text}");
        assert_eq!(b_dev().desired_revision, 0, "{forged:?}: nothing was set");
    }
    // Revoke (the id typed, the dialog accepted) with a wrong token: refused.
    c.goto(&format!("{b}/devices/b-dev")).await.unwrap();
    type_into(c, "#confirm", "b-dev").await;
    forge_csrf(c, "#confirm", Some(&"f".repeat(64))).await;
    click(c, "#revoke").await;
    c.accept_alert().await.expect("the confirmation dialog");
    wait_for_page_text(&browser, "CSRF").await;
    assert_eq!(
        b_dev().lifecycle,
        edgebind_fleet::registry::Lifecycle::Registered,
        "the forged revoke did nothing"
    );
    // The same form with the page's own token goes through.
    c.goto(&format!("{b}/devices/b-dev")).await.unwrap();
    type_into(c, "#settings-input", "log_level=debug").await;
    click(c, "#set").await;
    browser.wait_text(".notice", "revision 1", LONG).await;
    assert_eq!(b_dev().desired_revision, 1);
    stage("forged forms refused");

    // Home B's session against home A's console: the browser sends B's
    // cookie there too (cookies are per host, not per port), and home A
    // knows no such session: every page leads to its login page, a download
    // is refused, nothing of A's is served.
    for path in ["/devices", "/devices/a-dev", "/audit", "/factory"] {
        c.goto(&format!("{a}{path}")).await.unwrap();
        assert!(on_login_page(c).await, "home A's {path} with B's session");
    }
    let session_b = c
        .get_named_cookie(SESSION_COOKIE)
        .await
        .expect("home B's session cookie");
    let cookie_b = format!("{SESSION_COOKIE}={}", session_b.value());
    assert_eq!(
        curl_status(&format!("{a}/devices/a-dev/bundle.tar"), &ca_a, &cookie_b),
        401,
        "home A's bundle with home B's session"
    );
    // ... while it still opens home B's console, which has none of A's devices.
    assert_eq!(
        curl_status(&format!("{b}/devices/b-dev/bundle.tar"), &ca_b, &cookie_b),
        200
    );
    c.goto(&format!("{b}/devices/a-dev")).await.unwrap();
    let alert = browser.wait_text("[role=alert]", "a-dev", LONG).await;
    assert!(alert.contains("not in the registry"), "{alert}");
    c.goto(&format!("{b}/devices?q=a-dev")).await.unwrap();
    browser.wait_text("h1", "Devices", LONG).await;
    assert!(
        c.find(Locator::Css("tr[data-device=a-dev]")).await.is_err(),
        "home B lists no device of home A"
    );
    stage("home A refused home B's session");
    browser.client.clone().close().await.unwrap();
}

/// The text of the page once it contains `want`.
async fn wait_for_page_text(browser: &Browser, want: &str) -> String {
    browser.wait_text("body", want, LONG).await
}

/// The HTTP status of a GET with `cookie`, checked against `ca`.
fn curl_status(url: &str, ca: &Path, cookie: &str) -> u16 {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(ca)
        .args(["-H", &format!("cookie: {cookie}")])
        .arg(url)
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
