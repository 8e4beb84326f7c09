//! The web console under test: `edgebind console` on a free loopback port,
//! and headless Chromium (Debian's `chromium`, `chromium-driver`) driven
//! over WebDriver. A missing Chromium or chromedriver is an error that
//! names the package (scripts/setup installs them).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::{bin_path, spawn_tied, wait_for};

/// A child killed on drop (and, being tied, when the test process dies).
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `edgebind console`.
pub struct ConsoleProc {
    pub child: Killed,
    pub addr: SocketAddr,
}

impl ConsoleProc {
    /// `edgebind --home HOME console --listen 127.0.0.1:0 EXTRA...`, once it
    /// listens. `registry`: the `EDGEBIND_REGISTRY` to use, if any.
    pub fn start(home: &Path, registry: Option<&str>, extra: &[&str]) -> ConsoleProc {
        let mut cmd = Command::new(bin_path("edgebind"));
        cmd.arg("--home")
            .arg(home)
            .args(["console", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("EDGEBIND_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        match registry {
            Some(url) => cmd.env("EDGEBIND_REGISTRY", url),
            None => cmd.env_remove("EDGEBIND_REGISTRY"),
        };
        let mut child = Killed(spawn_tied(cmd).expect("spawn edgebind console"));
        let out = child.0.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("edgebind console: listening on https://")
            .and_then(|s| s.trim_end_matches('/').parse().ok())
            .unwrap_or_else(|| panic!("console did not start: {line:?}"));
        ConsoleProc { child, addr }
    }

    pub fn base(&self) -> String {
        format!("https://{}", self.addr)
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

/// Headless Chromium with its chromedriver, downloading into `downloads`.
pub struct Browser {
    pub client: Client,
    driver: Killed,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of our own child.
        unsafe {
            libc::kill(-(self.driver.0.id() as libc::pid_t), libc::SIGKILL);
        }
    }
}

impl Browser {
    pub async fn start(downloads: &Path, profile: &Path, width: u32, height: u32) -> Browser {
        let chrome = require("/usr/bin/chromium", "chromium");
        let driver = require("/usr/bin/chromedriver", "chromium-driver");
        let port = free_port();
        let mut cmd = Command::new(driver);
        // Its own process group, which Chromium joins: dropping the browser
        // kills them all (a SIGKILLed chromedriver would leave Chromium behind).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let driver = Killed(spawn_tied(cmd).expect("spawn chromedriver"));
        wait_for(Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .expect("chromedriver listens");
        let caps = json!({
            // The console's certificate is from the fleet PKI, which this
            // profile does not trust; the tests check it with that CA.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": chrome,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    format!("--window-size={width},{height}"), "--no-first-run", "--disable-extensions",
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
        Browser { client, driver }
    }

    /// The text of the element at `css` once it contains `want`.
    pub async fn wait_text(&self, css: &str, want: &str, timeout: Duration) -> String {
        self.try_wait_text(css, want, timeout)
            .await
            .unwrap_or_else(|last| {
                panic!("{css} never showed {want:?} within {timeout:?}; last: {last:?}")
            })
    }

    /// Like [`Browser::wait_text`]; Err(the last text seen) on timeout.
    pub async fn try_wait_text(
        &self,
        css: &str,
        want: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(el) = self.client.find(Locator::Css(css)).await
                && let Ok(text) = el.text().await
            {
                if text.contains(want) {
                    return Ok(text);
                }
                last = text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(last)
    }

    /// Log in through the login page with `code`.
    pub async fn log_in(&self, base: &str, code: &str) {
        self.client
            .goto(&format!("{base}/login?code={code}"))
            .await
            .unwrap();
        self.client
            .find(Locator::Css("button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        self.wait_text("h1", "Devices", Duration::from_secs(30))
            .await;
    }
}

/// The code in `edgebind console login`'s output (its `open: URL` line).
pub fn login_code(cli_output: &str) -> String {
    cli_output
        .lines()
        .find_map(|l| l.strip_prefix("open: "))
        .and_then(|url| url.split("code=").nth(1))
        .expect("a login URL with its code")
        .to_owned()
}
