//! `edgebind send`: parse the words, call the library's send, render the
//! progress and the outcomes.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use edgebind_fleet::operator::DeviceOutcome;
use edgebind_fleet::ops::{self, FleetHome, Mode, SendEvent, SendRequest, Sent, Targets};
use edgebind_fleet::registry::parse_args;
use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::Action;

use super::args::SendArgs;

/// Split `send`'s words into (device, action, key=value args).
fn send_words(args: &SendArgs) -> anyhow::Result<(Option<&str>, &str, &[String])> {
    let fan_out = args.tag.is_some() || args.all;
    match (fan_out, args.words.as_slice()) {
        (true, [action, rest @ ..]) => Ok((None, action, rest)),
        (false, [device, action, rest @ ..]) => Ok((Some(device), action, rest)),
        (false, [_]) => bail!("name the device and the action: `edgebind send <device> <action>`"),
        _ => bail!("name an action"),
    }
}

pub fn send(args: SendArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let (device, action, rest) = send_words(&args)?;
    let action: Action = action.parse().map_err(anyhow::Error::msg)?;
    let cmd_args = parse_args(rest.iter().chain(&args.arg).map(String::as_str))?;
    let targets = match (device, &args.tag, args.all) {
        (Some(id), _, _) => Targets::Device(DeviceId::new(id)?),
        (None, Some(tag), _) => Targets::Tag(tag.parse()?),
        (None, None, true) => Targets::All,
        (None, None, false) => bail!("name a device, --tag or --all"),
    };
    let mode = match (args.on_connect, args.queue, args.wait) {
        (true, _, _) => Mode::OnConnect,
        (false, true, true) => Mode::QueueAndWait,
        (false, true, false) => Mode::Queue,
        (false, false, _) => Mode::Now,
    };
    let req = SendRequest {
        targets,
        action: action.clone(),
        args: cmd_args,
        mode,
        timeout: Duration::from_secs(args.timeout),
        expires_in: args.expires_in,
        identity_dir: args
            .connect
            .identity
            .clone()
            .unwrap_or_else(|| home.operator_dir()),
        identity_explicit: args.connect.identity.is_some(),
        broker: args.connect.broker.clone(),
        rate: args.rate,
    };
    let mut store = home.open_registry()?;
    let started = std::time::Instant::now();
    // Results are printed as they come (human form); the summary follows.
    let mut streamed = false;
    let sent = ops::send(home, store.as_mut(), &req, |event| match event {
        SendEvent::IdentityIssued(i) => eprintln!(
            "edgebind: issued {} (serial {}) into {}",
            i.cn,
            i.serial,
            i.dir.display()
        ),
        SendEvent::Outcome(o) if !args.json => {
            // Clear the progress line first so the two never share a line.
            eprint!("\r\x1b[K");
            print_outcome(o, &action);
            let _ = std::io::stdout().flush();
            streamed = true;
        }
        SendEvent::Outcome(_) => {}
        SendEvent::Progress {
            done,
            total,
            failures,
        } if total > 1 && !args.json => {
            eprint!(
                "\r{}",
                progress_line(done, total, failures, started.elapsed())
            );
            let _ = std::io::stderr().flush();
            if done == total {
                eprintln!();
            }
        }
        SendEvent::Progress { .. } => {}
        SendEvent::NotChecked(d) => eprintln!(
            "edgebind: warning: {d} has reported no action list yet; arguments not checked here (the device checks them)"
        ),
    })?;
    let target = match &req.targets {
        Targets::Device(id) => id.to_string(),
        Targets::Tag(tag) => format!("tag:{tag}"),
        Targets::All => "all".into(),
    };
    crate::audit(
        home,
        store.as_mut(),
        "send",
        &target,
        &format!("{action} {}", sent_summary(&sent)),
    );
    match &sent {
        Sent::Rules(rules) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(rules)?);
            } else {
                for r in rules {
                    println!(
                        "{}: {} will run on every connect (rule {})",
                        r.device, r.action, r.id
                    );
                }
            }
        }
        Sent::Queued(queued) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(queued)?);
            } else {
                for c in queued {
                    println!(
                        "{}: {} queued as {} (delivered by the fleet service when the device is online)",
                        c.device, action, c.command
                    );
                }
            }
        }
        Sent::Finished {
            outcomes,
            not_recorded,
        } => {
            if let Some(e) = not_recorded {
                eprintln!("edgebind: warning: results not recorded in the registry: {e}");
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(outcomes)?);
            } else {
                if !streamed {
                    for o in outcomes {
                        print_outcome(o, &action);
                    }
                }
                print_summary(outcomes);
            }
        }
    }
    Ok(if sent.all_succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One line for the audit log.
fn sent_summary(sent: &Sent) -> String {
    match sent {
        Sent::Rules(r) => format!("{} on-connect rule(s)", r.len()),
        Sent::Queued(q) => format!("{} queued", q.len()),
        Sent::Finished { outcomes, .. } => {
            let mut counts = std::collections::BTreeMap::<&str, usize>::new();
            for o in outcomes {
                *counts.entry(o.outcome.label()).or_default() += 1;
            }
            counts
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

/// `[#########...........]  2500/5000  2490 ok  10 not ok  1250/s`
fn progress_line(done: usize, total: usize, failures: usize, elapsed: Duration) -> String {
    const WIDTH: usize = 24;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    format!(
        "[{}{}] {done:>width$}/{total}  {} ok  {failures} not ok  {:.0}/s",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        done - failures,
        done as f64 / elapsed.as_secs_f64().max(1e-3),
        width = total.to_string().len()
    )
}

fn print_outcome(o: &DeviceOutcome, action: &Action) {
    println!(
        "{:<24} {} {} ({} ms) [{}]{}",
        o.device,
        action,
        o.outcome.label(),
        o.elapsed_ms,
        o.command,
        o.outcome.detail()
    );
}

/// Counts by outcome (and when the last result came) for a fan-out.
fn print_summary(outcomes: &[DeviceOutcome]) {
    if outcomes.len() > 1 {
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for o in outcomes {
            *counts.entry(o.outcome.label()).or_default() += 1;
        }
        let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let last = outcomes.iter().map(|o| o.elapsed_ms).max().unwrap_or(0);
        println!(
            "{} devices: {} (last result after {:.1} s)",
            outcomes.len(),
            summary.join(", "),
            last as f64 / 1000.0
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::device::tests::{Cli, Top};

    fn send_args(argv: &[&str]) -> SendArgs {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied())).unwrap();
        match cli.cmd {
            Top::Send(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn send_words_split_by_target_kind() {
        let a = send_args(&["send", "dev-a", "reboot", "delay=5"]);
        let (d, action, rest) = send_words(&a).unwrap();
        assert_eq!((d, action, rest.len()), (Some("dev-a"), "reboot", 1));
        let a = send_args(&["send", "--tag", "lab", "ping"]);
        let (d, action, rest) = send_words(&a).unwrap();
        assert_eq!((d, action, rest.len()), (None, "ping", 0));
        let a = send_args(&["send", "dev-a"]);
        assert!(send_words(&a).is_err());
        assert!(Cli::try_parse_from(["x", "send", "--all", "--tag", "t", "ping"]).is_err());
        assert_eq!(
            send_args(&["send", "--all", "--rate", "50", "reboot"]).rate,
            Some(50)
        );
        assert!(
            Cli::try_parse_from(["x", "send", "--all", "--rate", "5", "--queue", "ping"]).is_err()
        );
    }

    #[test]
    fn the_progress_bar_fills_with_the_results() {
        let d = Duration::from_secs(2);
        let line = progress_line(0, 4, 0, d);
        assert!(
            line.starts_with("[........................] 0/4  0 ok  0 not ok"),
            "{line}"
        );
        let line = progress_line(2, 4, 1, d);
        assert!(
            line.starts_with("[############............] 2/4  1 ok  1 not ok  1/s"),
            "{line}"
        );
        assert!(progress_line(4, 4, 0, d).starts_with(&format!("[{}]", "#".repeat(24))));
    }
}
