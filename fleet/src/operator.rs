//! Operator side of a command: publish it to one or many devices and wait for
//! each device's final result.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use edgebind_protocol::messages::{Command, CommandResult, CommandStatus};
use edgebind_protocol::topics::{Kind, Topic};
use edgebind_protocol::{CommandId, DeviceId};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{Event, MqttOptions};
use serde::Serialize;

/// How one device's command ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Succeeded {
        #[serde(skip_serializing_if = "Option::is_none")]
        output: Option<serde_json::Value>,
    },
    Failed {
        reason: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        output: Option<serde_json::Value>,
    },
    Rejected {
        reason: Option<String>,
    },
    /// The broker refused the command itself (its PUBACK reason code, e.g.
    /// 0x87 not authorized): it never reached the device.
    Refused {
        reason: String,
    },
    /// No final result before the deadline (`accepted` tells whether the
    /// device at least acknowledged it).
    TimedOut {
        accepted: bool,
    },
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Succeeded { .. })
    }

    /// What follows the label in a one-line report: the output, or why not.
    pub fn detail(&self) -> String {
        let detail = match self {
            Outcome::Succeeded { output: Some(out) } => format!(" {out}"),
            Outcome::Failed { reason, output } => format!(
                " {}{}",
                reason.as_deref().unwrap_or(""),
                output.as_ref().map(|o| format!(" {o}")).unwrap_or_default()
            ),
            Outcome::Rejected { reason } => format!(" {}", reason.as_deref().unwrap_or("")),
            Outcome::Refused { reason } => format!(" {reason}"),
            Outcome::Succeeded { output: None } | Outcome::TimedOut { .. } => String::new(),
        };
        detail.trim_end().to_owned()
    }

    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Failed { .. } => "failed",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Refused { .. } => "refused by the broker",
            Outcome::TimedOut { accepted: true } => "timed out (accepted)",
            Outcome::TimedOut { accepted: false } => "timed out",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceOutcome {
    pub device: DeviceId,
    pub command: CommandId,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub elapsed_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("could not connect to the broker: {0}")]
    Connect(String),
}

/// How long publishing `total` commands at `rate` per second takes.
pub fn pacing_time(total: usize, rate: Option<u32>) -> Duration {
    match rate {
        Some(r) if r > 0 => Duration::from_secs_f64(total as f64 / f64::from(r)),
        _ => Duration::ZERO,
    }
}

/// Everything the wait produced: per-device outcomes (in the order of the
/// commands) and every result message seen (for the registry).
#[derive(Debug, Default)]
pub struct SendReport {
    pub outcomes: Vec<DeviceOutcome>,
    pub results: Vec<(DeviceId, CommandResult)>,
}

struct Pending {
    index: usize,
    accepted: bool,
    done: bool,
}

/// Publish `commands` (QoS 1) once the result subscription is in place and
/// wait up to `timeout` for every final result. `rate` paces the publishing
/// (commands per second; `None`: as fast as the broker takes them), and the
/// wait is extended by the time pacing takes. `progress(done, total,
/// outcome)` is called as each device finishes.
pub async fn send_and_wait(
    mut opts: MqttOptions,
    commands: Vec<(DeviceId, Command)>,
    timeout: Duration,
    rate: Option<u32>,
    mut progress: impl FnMut(usize, usize, &DeviceOutcome),
) -> Result<SendReport, SendError> {
    opts.set_clean_start(true);
    let total = commands.len();
    let (client, mut eventloop) = crate::mqtt::connect(opts, total.max(16) * 2 + 16);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout + pacing_time(total, rate);

    let mut pending: HashMap<(DeviceId, CommandId), Pending> = commands
        .iter()
        .enumerate()
        .map(|(index, (d, c))| {
            (
                (d.clone(), c.id.clone()),
                Pending {
                    index,
                    accepted: false,
                    done: false,
                },
            )
        })
        .collect();
    let mut outcomes: Vec<Option<DeviceOutcome>> = vec![None; total];
    let mut results = Vec::new();
    let mut finished = 0usize;
    let mut connected_once = false;
    let mut published = false;
    let mut last_error: Option<String> = None;
    // The broker's PUBACKs say whether it took each command; rumqttc reports
    // the outgoing packet ids in the order the publishes were requested.
    let order: Vec<(DeviceId, CommandId)> = commands
        .iter()
        .map(|(d, c)| (d.clone(), c.id.clone()))
        .collect();
    let mut next_outgoing = 0usize;
    let mut by_pkid: HashMap<u16, (DeviceId, CommandId)> = HashMap::new();
    let mut to_publish = Some(commands);

    while finished < total {
        let event = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => break,
            Ok(e) => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected_once = true;
                client
                    .subscribe(Kind::CmdResult.filter_all(), QoS::AtLeastOnce)
                    .await
                    .map_err(|e| SendError::Connect(e.to_string()))?;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) if !published => {
                published = true;
                let batch = to_publish.take().unwrap_or_default();
                let c = client.clone();
                // Publish from another task: the request channel is drained
                // by this loop, so publishing here could wait on itself.
                tokio::spawn(async move {
                    let begun = tokio::time::Instant::now();
                    for (i, (device, command)) in batch.into_iter().enumerate() {
                        if let Some(r) = rate.filter(|r| *r > 0) {
                            let at = begun + Duration::from_secs_f64(i as f64 / f64::from(r));
                            tokio::time::sleep_until(at).await;
                        }
                        let topic = Topic::Cmd(device, command.id.clone()).render();
                        if c.publish(topic, QoS::AtLeastOnce, false, command.encode())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(key) = order.get(next_outgoing) {
                    by_pkid.insert(pkid, key.clone());
                    next_outgoing += 1;
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let Some(key) = by_pkid.remove(&ack.pkid) else {
                    continue;
                };
                if matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ) {
                    continue;
                }
                let Some(entry) = pending.get_mut(&key) else {
                    continue;
                };
                if entry.done {
                    continue;
                }
                entry.done = true;
                finished += 1;
                let o = DeviceOutcome {
                    device: key.0,
                    command: key.1,
                    outcome: Outcome::Refused {
                        reason: puback_reason(ack.reason),
                    },
                    elapsed_ms: started.elapsed().as_millis() as u64,
                };
                progress(finished, total, &o);
                outcomes[entry.index] = Some(o);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic);
                let Some(Topic::CmdResult(device, id)) = Topic::parse(&topic) else {
                    continue;
                };
                let Some(entry) = pending.get_mut(&(device.clone(), id.clone())) else {
                    continue;
                };
                let Ok(result) = serde_json::from_slice::<CommandResult>(&p.payload) else {
                    continue;
                };
                if entry.done {
                    continue;
                }
                let outcome = match result.status {
                    CommandStatus::Accepted => {
                        entry.accepted = true;
                        results.push((device, result));
                        continue;
                    }
                    CommandStatus::Succeeded => Outcome::Succeeded {
                        output: result.output.clone(),
                    },
                    CommandStatus::Failed | CommandStatus::TimedOut => Outcome::Failed {
                        reason: result.reason.clone(),
                        output: result.output.clone(),
                    },
                    CommandStatus::Rejected => Outcome::Rejected {
                        reason: result.reason.clone(),
                    },
                };
                entry.done = true;
                finished += 1;
                let o = DeviceOutcome {
                    device: device.clone(),
                    command: id,
                    outcome,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                };
                progress(finished, total, &o);
                outcomes[entry.index] = Some(o);
                results.push((device, result));
            }
            Ok(_) => {}
            Err(e) => {
                last_error = Some(e.to_string());
                if !connected_once && started.elapsed() > Duration::from_secs(5) {
                    break;
                }
                let _ = tokio::time::timeout_at(
                    deadline,
                    tokio::time::sleep(Duration::from_millis(300)),
                )
                .await;
            }
        }
    }
    if !connected_once {
        return Err(SendError::Connect(
            last_error.unwrap_or_else(|| "no answer before the timeout".into()),
        ));
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;

    for ((device, command), p) in pending {
        if !p.done {
            let o = DeviceOutcome {
                device,
                command,
                outcome: Outcome::TimedOut {
                    accepted: p.accepted,
                },
                elapsed_ms: started.elapsed().as_millis() as u64,
            };
            finished += 1;
            progress(finished, total, &o);
            outcomes[p.index] = Some(o);
        }
    }
    Ok(SendReport {
        outcomes: outcomes.into_iter().flatten().collect(),
        results,
    })
}

/// An operator-readable PUBACK reason with its code.
pub fn puback_reason(reason: PubAckReason) -> String {
    let (code, text) = match reason {
        PubAckReason::Success => (0x00, "success"),
        PubAckReason::NoMatchingSubscribers => (0x10, "no matching subscribers"),
        PubAckReason::UnspecifiedError => (0x80, "unspecified error"),
        PubAckReason::ImplementationSpecificError => (0x83, "implementation specific error"),
        PubAckReason::NotAuthorized => (0x87, "not authorized"),
        PubAckReason::TopicNameInvalid => (0x90, "topic name invalid"),
        PubAckReason::PacketIdentifierInUse => (0x91, "packet identifier in use"),
        PubAckReason::QuotaExceeded => (0x97, "quota exceeded"),
        PubAckReason::PayloadFormatInvalid => (0x99, "payload format invalid"),
    };
    format!("{text} (0x{code:02x})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_publish_names_its_reason_code() {
        assert_eq!(
            puback_reason(PubAckReason::NotAuthorized),
            "not authorized (0x87)"
        );
        assert_eq!(
            Outcome::Refused {
                reason: puback_reason(PubAckReason::QuotaExceeded)
            }
            .label(),
            "refused by the broker"
        );
    }
}
