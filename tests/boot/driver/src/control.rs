//! The host end of the test-only control channel (guest side:
//! tests/boot/guest/edgebind-testctl). The guest connects out through QEMU's
//! guestfwd to a listener on 127.0.0.1, says HELLO with its boot id, then
//! runs each command we send as root.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::b64;

/// Listens on loopback for the guest's control connections (one per boot).
pub struct ControlListener {
    listener: TcpListener,
}

impl ControlListener {
    pub fn bind() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the control listener")?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Waits for the next boot's HELLO. `alive` is polled so that a VM that
    /// died is reported at once instead of after the deadline.
    pub fn accept(
        &self,
        deadline: Instant,
        mut alive: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Guest> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(Duration::from_secs(150)))?;
                    let mut reader = BufReader::new(stream.try_clone()?);
                    let mut hello = String::new();
                    reader
                        .read_line(&mut hello)
                        .context("reading the guest's HELLO")?;
                    let boot_id = hello
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("boot_id="))
                        .map(str::to_owned);
                    let Some(boot_id) = boot_id else {
                        // Not our guest script (or a half-open connection): keep waiting.
                        eprintln!("control: ignoring a connection that said {hello:?}");
                        continue;
                    };
                    return Ok(Guest {
                        boot_id,
                        writer: stream,
                        reader,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    alive()?;
                    if Instant::now() > deadline {
                        bail!("the guest's control channel did not connect in time");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e).context("accepting the guest's control connection"),
            }
        }
    }
}

/// One booted guest's control connection.
pub struct Guest {
    pub boot_id: String,
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

/// What a command printed (stdout and stderr together) and its exit code.
pub struct Output {
    pub rc: i32,
    pub text: String,
}

impl Guest {
    /// Runs `cmd` with bash as root in the guest (120 s limit in the guest).
    pub fn run(&mut self, cmd: &str) -> anyhow::Result<Output> {
        writeln!(self.writer, "{}", b64::encode(cmd.as_bytes()))
            .with_context(|| format!("sending {cmd:?} to the guest"))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .with_context(|| format!("waiting for the result of {cmd:?}"))?;
        if n == 0 {
            bail!("the guest closed the control channel while running {cmd:?}");
        }
        let mut parts = line.trim_end().splitn(3, ' ');
        let (Some("RESULT"), Some(rc), out) = (parts.next(), parts.next(), parts.next()) else {
            bail!("unexpected control channel line {line:?}");
        };
        let rc: i32 = rc.parse().with_context(|| format!("bad rc in {line:?}"))?;
        let text = String::from_utf8_lossy(&b64::decode(out.unwrap_or(""))?).into_owned();
        Ok(Output { rc, text })
    }

    /// Runs `cmd` and fails unless it exits 0.
    pub fn check(&mut self, cmd: &str) -> anyhow::Result<String> {
        let out = self.run(cmd)?;
        if out.rc != 0 {
            bail!("guest command {cmd:?} exited {}:\n{}", out.rc, out.text);
        }
        Ok(out.text)
    }

    /// Asks the guest to do something that ends this connection (reboot,
    /// poweroff): sent without waiting for a result.
    pub fn send_detached(mut self, cmd: &str) -> anyhow::Result<()> {
        // systemd-run so the command outlives the control service stopping.
        let wrapped = format!("systemd-run --no-block --quiet {cmd}");
        writeln!(self.writer, "{}", b64::encode(wrapped.as_bytes()))?;
        Ok(())
    }
}
