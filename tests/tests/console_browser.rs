//! The web console in a real browser: headless Chromium (Debian's
//! `chromium`, `chromium-driver`) over WebDriver, against `edgebind console`
//! on a fleet home with a real Mosquitto, the fleet service and a real
//! agent. Everything listens on 127.0.0.1. A missing Chromium or
//! chromedriver fails the test (scripts/setup installs them).

mod fleet_support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgebind_tests::{bin_path, spawn_tied, wait_for};
use fantoccini::{Client, ClientBuilder, Locator};
use fleet_support::{AgentTweaks, Fleet, LONG};
use serde_json::json;

/// A child killed on drop (and, being tied, when the test process dies).
struct Child9(Child);

impl Drop for Child9 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn require(path: &str, package: &str) -> PathBuf {
    let p = PathBuf::from(path);
    assert!(
        p.is_file(),
        "{path} is missing: install the Debian package {package} (scripts/setup does)"
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `edgebind console` on a free loopback port; its address once it listens.
fn start_console(fleet: &Fleet) -> (Child9, SocketAddr) {
    let mut cmd = Command::new(bin_path("edgebind"));
    cmd.arg("--home")
        .arg(fleet.home())
        .args(["console", "--listen", "127.0.0.1:0"])
        .env_remove("EDGEBIND_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = Child9(spawn_tied(cmd).expect("spawn edgebind console"));
    let out = child.0.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("edgebind console: listening on https://")
        .and_then(|s| s.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("console did not start: {line:?}"));
    (child, addr)
}

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

async fn chromium(downloads: &Path, profile: &Path) -> (Child9, Client) {
    let chrome = require("/usr/bin/chromium", "chromium");
    let driver = require("/usr/bin/chromedriver", "chromium-driver");
    let port = free_port();
    let mut cmd = Command::new(driver);
    cmd.arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = Child9(spawn_tied(cmd).expect("spawn chromedriver"));
    wait_for(LONG, || TcpStream::connect(("127.0.0.1", port)).ok()).expect("chromedriver listens");
    let caps = json!({
        // The console's certificate is from the fleet PKI, which this
        // profile does not trust; `assert_served_with_fleet_ca` checks it.
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": chrome,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--disable-component-update",
                format!("--user-data-dir={}", profile.display()),
            ],
            "prefs": {
                "download.default_directory": downloads,
                "download.prompt_for_download": false,
                "safebrowsing.enabled": false,
            },
        },
    });
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps.as_object().unwrap().clone())
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("WebDriver session with headless Chromium");
    (child, client)
}

async fn wait_text(c: &Client, css: &str, want: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(el) = c.find(Locator::Css(css)).await
            && let Ok(text) = el.text().await
        {
            if text.contains(want) {
                return text;
            }
            last = text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{css} never showed {want:?} within {timeout:?}; last: {last:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_onboards_a_device_in_the_browser_and_sees_it_come_online() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    let (_console, addr) = start_console(&fleet);
    assert_served_with_fleet_ca(addr, &fleet.home().join("pki").join("root-ca.crt"));

    let work = tempfile::tempdir().unwrap();
    let downloads = work.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let (_driver, c) = chromium(&downloads, &work.path().join("profile")).await;
    let base = format!("https://{addr}");

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
    screenshot(&c, "login.png").await;
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "h1", "Devices", LONG).await;
    stage("logged in");
    // The code is used up: the same link no longer logs in.
    c.goto(&url).await.unwrap();
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "[role=alert]", "refused", LONG).await;
    let nobody = fleet.cli(&["console", "login", "--operator", "nobody"]);
    assert!(
        !nobody.status.success(),
        "only the fleet's operators get a code"
    );

    // Add one device: board, tags, initial settings, its id.
    c.goto(&format!("{base}/add")).await.unwrap();
    c.find(Locator::Css("#ids"))
        .await
        .unwrap()
        .send_keys("web-1")
        .await
        .unwrap();
    c.find(Locator::Css("#tags"))
        .await
        .unwrap()
        .send_keys("lab")
        .await
        .unwrap();
    c.find(Locator::Css("#settings"))
        .await
        .unwrap()
        .send_keys("log_level=debug")
        .await
        .unwrap();
    screenshot(&c, "add.png").await;
    c.find(Locator::Css("#register"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let result = wait_text(&c, "#added", "registered", LONG).await;
    stage("registered");
    assert!(result.contains("web-1"), "{result}");

    // Download its identity bundle through the browser.
    c.find(Locator::Css("a.bundle"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let tar = downloads.join("web-1.tar");
    wait_for(LONG, || {
        let partial = std::fs::read_dir(&downloads)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".crdownload"));
        (tar.is_file() && !partial).then_some(())
    })
    .unwrap_or_else(|| panic!("the bundle was not downloaded into {}", downloads.display()));
    stage("bundle downloaded");
    let bundle = work.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    tar::Archive::new(std::fs::File::open(&tar).unwrap())
        .unpack(&bundle)
        .unwrap();
    for f in ["agent.toml", "device.crt", "device.key", "ca.crt"] {
        assert!(bundle.join(f).is_file(), "{f} in the downloaded bundle");
    }

    // The list shows it, never seen; the registry has its initial settings.
    c.goto(&format!("{base}/devices")).await.unwrap();
    wait_text(&c, "tr[data-device=web-1]", "never seen", LONG).await;
    let d = fleet.store().device(&"web-1".parse().unwrap()).unwrap();
    assert_eq!(d.desired.get("log_level"), Some(&json!("debug")));

    // A real agent with the downloaded bundle: the row turns online without a reload.
    let config = fleet.agent_config(&bundle, &AgentTweaks::default());
    let mut agent = fleet.spawn_agent(&config);
    stage("agent started");
    let marker: String = c
        .execute("window.__notReloaded = 1; return 'set';", vec![])
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(marker, "set");
    let started = Instant::now();
    let row = wait_text(&c, "tr[data-device=web-1]", "online", LONG).await;
    eprintln!("row online after {:?}: {row}", started.elapsed());
    let same_page = c
        .execute("return window.__notReloaded === 1;", vec![])
        .await
        .unwrap();
    assert_eq!(same_page, json!(true), "the page was not reloaded");
    screenshot(&c, "devices.png").await;

    // The device page: a chart of its telemetry; ping through the console,
    // as `edgebind send` would.
    fleet.wait_device("web-1", LONG, "telemetry", |d| d.telemetry_count >= 2);
    c.goto(&format!("{base}/devices/web-1")).await.unwrap();
    wait_text(&c, "#state", "online", LONG).await;
    c.find(Locator::Css("#telemetry-chart polyline"))
        .await
        .expect("the telemetry chart");
    let ping = c
        .find(Locator::Css("#action option[value=ping]"))
        .await
        .unwrap();
    ping.click().await.unwrap();
    c.find(Locator::Css("#send"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let notice = wait_text(&c, ".notice", "ping", LONG).await;
    assert!(
        notice.contains("succeeded"),
        "{notice}\nagent log:\n{}",
        agent.log()
    );
    // The settings converge: the agent applied the initial log_level.
    wait_text(&c, "#live", "· converged", LONG).await;
    screenshot(&c, "device.png").await;
    stage("pinged, converged");

    // Revoke, confirmed twice (the id typed, then the dialog): marked revoked.
    c.find(Locator::Css("#confirm"))
        .await
        .unwrap()
        .send_keys("web-1")
        .await
        .unwrap();
    c.find(Locator::Css("#revoke"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.accept_alert().await.expect("the confirmation dialog");
    wait_text(&c, ".notice", "revoked web-1", LONG).await;
    wait_text(&c, "#state", "revoked", LONG).await;
    assert!(
        c.find(Locator::Css("#send")).await.is_err(),
        "no actions for a revoked device"
    );
    stage("revoked");

    // The audit log names the operator for each change.
    c.goto(&format!("{base}/audit")).await.unwrap();
    let log = wait_text(&c, "#audit", "revoke", LONG).await;
    for what in ["console.login", "device.add", "send", "revoke"] {
        assert!(log.contains(what), "{what} in the audit log: {log}");
    }
    assert!(log.contains("operator:tester"), "{log}");
    screenshot(&c, "audit.png").await;

    c.close().await.unwrap();
    agent.terminate();
}
