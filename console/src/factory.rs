//! The factory side of onboarding: claim batches (a list of unit serials
//! on a batch's allow-list, and the batch's claim identity that the units'
//! image carries to ask for their own certificates) and the factory line's
//! manufacturing records.
//!
//! The allow-list is written with the registry's `allow_serials` and the
//! claim identity issued with `ops::identity::ensure_identity`, through
//! [`allow_batch`] alone, so that the console can switch to a `fleet::ops`
//! use case for "factory allow" when there is one.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use edgebind_fleet::ops::{self, FleetHome, OpsError};
use edgebind_fleet::registry::{AllowReport, ClaimSerial, ManufacturingRecord, Store};
use edgebind_protocol::{DeviceId, Principal, UnitSerial};
use maud::{Markup, html};
use serde::Deserialize;

use crate::Console;
use crate::auth::Operator;
use crate::handlers::{Failure, with_store};
use crate::pages::{csrf, layout, unix_time};

type Shared = Arc<Console>;

/// Manufacturing records shown (the latest).
const RECORDS_SHOWN: usize = 200;

/// Put `serials` on `batch`'s allow-list and make sure the batch has its
/// claim identity (`claim:BATCH`, in `<home>/identities/`).
pub fn allow_batch(
    home: &FleetHome,
    store: &mut dyn Store,
    batch: &DeviceId,
    serials: &[UnitSerial],
) -> Result<AllowReport, OpsError> {
    let principal = Principal::Claim(batch.clone());
    ops::identity::ensure_identity(
        home,
        &home.identity_dir(&principal),
        &principal,
        edgebind_certs::profile::default_days::CLAIM,
    )?;
    Ok(store.allow_serials(batch, serials)?)
}

/// The serials of a textarea: one per line or separated by spaces/commas.
fn parse_serials(text: &str) -> Result<Vec<UnitSerial>, String> {
    let mut serials: Vec<UnitSerial> = Vec::new();
    for word in text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
    {
        let s = UnitSerial::new(word).map_err(|e| e.to_string())?;
        if serials.contains(&s) {
            return Err(format!("{s} is listed twice"));
        }
        serials.push(s);
    }
    if serials.is_empty() {
        return Err("list at least one unit serial".into());
    }
    Ok(serials)
}

pub async fn page(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
) -> Result<Response, Failure> {
    let records = with_store(&console, |_, store| Ok(store.manufacturing_records()?))
        .await
        .map_err(|e| e.for_operator(&op))?;
    Ok(factory_page(&op, &records, None).into_response())
}

#[derive(Deserialize)]
pub struct ClaimForm {
    batch: String,
    serials: String,
}

pub async fn claim(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Form(form): Form<ClaimForm>,
) -> Result<Response, Failure> {
    let checked = DeviceId::new(form.batch.trim())
        .map_err(|e| format!("batch name: {e}"))
        .and_then(|b| Ok((b, parse_serials(&form.serials)?)));
    let (batch, serials) = match checked {
        Ok(c) => c,
        Err(e) => {
            let records = with_store(&console, |_, store| Ok(store.manufacturing_records()?))
                .await
                .map_err(|e| e.for_operator(&op))?;
            return Ok((
                StatusCode::BAD_REQUEST,
                factory_page(&op, &records, Some(&e)),
            )
                .into_response());
        }
    };
    let operator = op.name.clone();
    let target = batch.clone();
    let report = with_store(&console, move |home, store| {
        let report = allow_batch(home, store, &target, &serials)?;
        let detail = format!(
            "{} serial(s) allowed, {} already on the list",
            report.added.len(),
            report.already.len()
        );
        crate::handlers::audit(
            store,
            &operator,
            "factory.allow",
            &format!("claim:{target}"),
            &detail,
        );
        Ok(report)
    })
    .await
    .map_err(|e| e.for_operator(&op))?;
    console.sessions.flash(
        &op,
        format!(
            "claim batch {batch}: {} serial(s) added to the allow-list, {} already on it",
            report.added.len(),
            report.already.len()
        ),
    );
    Ok(Redirect::to(&format!("/factory/claims/{batch}")).into_response())
}

pub async fn batch(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(batch): Path<String>,
) -> Result<Response, Failure> {
    let err = |e: Failure| e.for_operator(&op);
    let batch = DeviceId::new(&batch).map_err(|e| err(e.into()))?;
    let b = batch.clone();
    let serials = with_store(&console, move |_, store| Ok(store.claim_serials(&b)?))
        .await
        .map_err(err)?;
    let principal = Principal::Claim(batch.clone());
    let has_identity =
        ops::identity::identity_cn(&console.config.home.identity_dir(&principal)).is_some();
    Ok(batch_page(&op, &batch, &serials, has_identity).into_response())
}

/// The batch's claim identity as a tar (client.crt, client.key, ca.crt):
/// what the batch's image carries.
pub async fn identity(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(batch): Path<String>,
) -> Result<Response, Failure> {
    let err = |e: Failure| e.for_operator(&op);
    let batch = DeviceId::new(&batch).map_err(|e| err(e.into()))?;
    let dir = console
        .config
        .home
        .identity_dir(&Principal::Claim(batch.clone()));
    let tar = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let mut out = tar::Builder::new(Vec::new());
        for name in ["client.crt", "client.key", "ca.crt"] {
            out.append_path_with_name(dir.join(name), name)
                .map_err(|e| format!("{}: {e}", dir.join(name).display()))?;
        }
        out.into_inner().map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| {
        err(Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        ))
    })?
    .map_err(|e| {
        err(Failure::new(
            StatusCode::NOT_FOUND,
            format!("no claim identity for batch {batch}: {e}"),
        ))
    })?;
    let who = op.name.clone();
    let target = format!("claim:{batch}");
    crate::handlers::audit_later(
        &console,
        &who,
        "factory.claim-identity",
        &target,
        "downloaded".into(),
    )
    .await;
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"claim-{batch}.tar\""),
            ),
        ],
        tar,
    )
        .into_response())
}

fn factory_page(op: &Operator, records: &[ManufacturingRecord], error: Option<&str>) -> Markup {
    let mut latest: Vec<&ManufacturingRecord> = records.iter().collect();
    latest.sort_by(|a, b| b.made_at.cmp(&a.made_at).then(a.serial.cmp(&b.serial)));
    layout(
        op,
        "Factory",
        html! {
            h1 { "Factory" }
            @if let Some(e) = error { div.error role="alert" { (e) } }
            section.card {
                h2 { "Claim batch" }
                p.muted { "Units of a claim batch boot with the batch's claim identity, ask the fleet for \
                    their own certificate with their serial number, and get one only if the serial is on \
                    the batch's allow-list (once per serial)." }
                form #claim method="post" action="/factory/claims" {
                    (csrf(op))
                    div.grid {
                        div {
                            label for="batch" { "Batch name (the claim identity is claim:NAME)" }
                            input #batch type="text" name="batch" required autocomplete="off";
                        }
                        div {
                            label for="serials" { "Unit serials (one per line)" }
                            textarea #serials name="serials" required {}
                        }
                    }
                    p { button #allow type="submit" { "Allow these serials" } }
                }
            }
            section.card {
                h2 { "Manufacturing records (" (records.len()) ")" }
                @if records.is_empty() {
                    p.muted { "No unit made yet: " code { "edgebind factory run" } " records each one." }
                } @else {
                    table #records {
                        thead { tr { th { "Serial" } th { "Device" } th { "Made" } th { "Station" }
                            th.hide-narrow { "By" } th.hide-narrow { "Certificate" } th.hide-narrow { "Image" } } }
                        tbody {
                            @for r in latest.iter().take(RECORDS_SHOWN) {
                                tr {
                                    td.mono { (r.serial) }
                                    td { a href={"/devices/" (r.device)} { (r.device) } }
                                    td { (unix_time(Some(r.made_at))) }
                                    td { (r.station) }
                                    td.hide-narrow { (r.operator) }
                                    td.mono.hide-narrow { (r.cert_serial) }
                                    td.mono.hide-narrow { (r.image_sha256.as_deref().map(|h| &h[..h.len().min(12)]).unwrap_or("bundle only")) }
                                }
                            }
                        }
                    }
                    @if records.len() > RECORDS_SHOWN { p.muted { "The latest " (RECORDS_SHOWN) " shown." } }
                }
            }
        },
    )
}

fn batch_page(op: &Operator, batch: &DeviceId, serials: &[ClaimSerial], identity: bool) -> Markup {
    let provisioned = serials.iter().filter(|s| s.provisioned.is_some()).count();
    layout(
        op,
        &format!("Claim batch {batch}"),
        html! {
            h1 { "Claim batch " (batch) }
            section.card {
                dl {
                    dt { "Claim identity" } dd { code { "claim:" (batch) } }
                    dt { "Serials allowed" } dd #allowed { (serials.len()) }
                    dt { "Provisioned" } dd #provisioned { (provisioned) }
                }
                @if identity {
                    p { a #claim-identity href={"/factory/claims/" (batch) "/identity.tar"} download {
                        "Download the claim identity (tar: client.crt, client.key, ca.crt)" } }
                    p.muted { "It goes into the batch's image; it can only ask for certificates for the serials \
                        on this list. Revoke it when the batch is done: " code { "edgebind revoke claim:" (batch) } "." }
                }
            }
            section.card {
                h2 { "Allow-list" }
                table #serials-table {
                    thead { tr { th { "Serial" } th { "Allowed" } th { "Device" } } }
                    tbody {
                        @for s in serials {
                            tr {
                                td.mono { (s.serial) }
                                td { (unix_time(Some(s.allowed_at))) }
                                td { @match &s.provisioned {
                                    Some(p) => { a href={"/devices/" (p.device)} { (p.device) } }
                                    None => { span.muted { "not yet" } }
                                } }
                            }
                        }
                    }
                }
            }
            p { a href="/factory" { "Back to the factory" } }
        },
    )
}
