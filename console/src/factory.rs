//! The factory side of onboarding: claim batches (a list of unit serials
//! on a batch's allow-list, and the batch's claim identity that the units'
//! image carries to ask for their own certificates), factory batches (units
//! made at once, each with its own personalized image) and the factory
//! line's manufacturing records.
//!
//! Images come from the golden images of `--images DIR`, through the fleet
//! library as the CLI makes them: a factory batch is
//! `ops::factory::run` (`edgebind factory run --image`), a claim batch's
//! image is `ops::claim::claim_identity` (`edgebind factory claim-identity`)
//! written onto a copy of the golden image with `ops::write_image`.
//!
//! The allow-list is written with the registry's `allow_serials` and the
//! claim identity issued with `ops::identity::ensure_identity`, through
//! [`allow_batch`] alone, so that the console can switch to a `fleet::ops`
//! use case for "factory allow" when there is one.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use edgebind_fleet::ops::factory::{
    FactoryOutput, FactoryReport, FactoryRun, ManifestUnit, Outcome, device_id_for_serial,
    manifest::check_serial,
};
use edgebind_fleet::ops::{self, FleetHome, OpsError};
use edgebind_fleet::registry::{
    AllowReport, Board, ClaimSerial, KNOWN_BOARDS, ManufacturingRecord, RegistryError, Store, Tag,
};
use edgebind_protocol::bundle::{SerialSource, defaults::CLAIM_SERIAL_FILE};
use edgebind_protocol::{DeviceId, Principal, UnitSerial};
use maud::{Markup, html};
use serde::Deserialize;

use crate::Console;
use crate::auth::Operator;
use crate::handlers::{Failure, golden_images, golden_path, image_path, with_store};
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
    Ok(factory_page(&op, &records, &golden_images(&console), None).into_response())
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
        Err(e) => return refused_form(&console, &op, &e).await,
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
    let image = claim_image_path(&console.config.home, &batch)
        .metadata()
        .ok()
        .map(|m| format!("{} MiB", m.len() >> 20));
    let view = BatchView {
        batch: &batch,
        serials: &serials,
        identity: has_identity,
        image,
        golden: golden_images(&console),
    };
    Ok(batch_page(&op, &view).into_response())
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

fn factory_page(
    op: &Operator,
    records: &[ManufacturingRecord],
    images: &[String],
    error: Option<&str>,
) -> Markup {
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
                h2 { "Factory batch (a personalized image per unit)" }
                p.muted { "Each unit is registered as the device its serial names (ACME-0001 becomes \
                    acme-0001) with its manufacturing record, and gets its own copy of the golden image \
                    with its identity bundle on the boot partition, as " code { "edgebind factory run --image" }
                    " makes it. A serial already made is skipped: it never gets a second certificate." }
                @if images.is_empty() {
                    p.muted { "No golden images: start the console with --images DIR." }
                } @else {
                    form #batch-form method="post" action="/factory/batches" {
                        (csrf(op))
                        div.grid {
                            div {
                                label for="batch-board" { "Board" }
                                select #batch-board name="board" {
                                    @for b in KNOWN_BOARDS { option value=(b) { (b) } }
                                }
                                label for="batch-tags" { "Tags (space or comma separated)" }
                                input #batch-tags type="text" name="tags" size="30";
                                label for="batch-image" { "Golden image" }
                                select #batch-image name="image" required {
                                    @for i in images { option value=(i) { (i) } }
                                }
                            }
                            div {
                                label for="batch-serials" { "Unit serials (one per line)" }
                                textarea #batch-serials name="serials" required {}
                            }
                        }
                        p { button #make-batch type="submit" { "Make the batch's images" } }
                    }
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

/// What a claim batch's page shows.
struct BatchView<'a> {
    batch: &'a DeviceId,
    serials: &'a [ClaimSerial],
    /// The console has issued the batch's claim identity.
    identity: bool,
    /// The size of the batch's claim image, once made.
    image: Option<String>,
    /// The golden images offered.
    golden: Vec<String>,
}

fn batch_page(op: &Operator, v: &BatchView) -> Markup {
    let (batch, serials, identity) = (v.batch, v.serials, v.identity);
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
                h2 { "Claim image" }
                p.muted { "One image for every unit of the batch: a copy of a golden image with the batch's claim \
                    bundle (a new claim certificate, the broker's provisioning port, the serial read from "
                    code { (CLAIM_SERIAL_FILE) } ") on its boot partition. Each unit asks for its own certificate \
                    on first boot." }
                @if let Some(size) = &v.image {
                    p { a #claim-image href={"/factory/claims/" (batch) "/image"} download {
                        "Download the claim image (" (size) ")" } }
                }
                @if v.golden.is_empty() {
                    p.muted { "No golden images: start the console with --images DIR." }
                } @else {
                    form #claim-image-form method="post" action={"/factory/claims/" (batch) "/image"} {
                        (csrf(op))
                        label for="claim-golden" { "Golden image" }
                        select #claim-golden name="image" required {
                            @for i in &v.golden { option value=(i) { (i) } }
                        }
                        p { button #make-claim-image type="submit" {
                            @if v.image.is_some() { "Make it again (a new claim certificate)" } @else { "Make the claim image" }
                        } }
                    }
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

#[derive(Deserialize)]
pub struct BatchForm {
    board: String,
    #[serde(default)]
    tags: String,
    serials: String,
    image: String,
}

/// A factory batch's units and golden image, checked before anything is
/// made: each serial as the factory manifest takes it, each naming its own
/// device.
fn check_batch(
    console: &Console,
    form: &BatchForm,
) -> Result<(Vec<ManifestUnit>, PathBuf), String> {
    let board: Board = form
        .board
        .parse()
        .map_err(|e: RegistryError| e.to_string())?;
    let tags = form
        .tags
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<Tag>().map_err(|e| e.to_string()))
        .collect::<Result<BTreeSet<_>, _>>()?;
    let mut units: Vec<ManifestUnit> = Vec::new();
    for (i, serial) in form.serials.split_whitespace().enumerate() {
        let line = i as u64 + 1;
        check_serial(serial).map_err(|e| format!("unit {line}: {e}"))?;
        let id = device_id_for_serial(serial).map_err(|e| format!("unit {line}: {e}"))?;
        if let Some(first) = units.iter().find(|u| u.id == id) {
            return Err(format!(
                "units {} and {line} ({:?} and {serial:?}) would both be device {id}",
                first.line, first.serial
            ));
        }
        units.push(ManifestUnit {
            line,
            serial: serial.to_owned(),
            id,
            board: board.clone(),
            tags: tags.clone(),
        });
    }
    if units.is_empty() {
        return Err("list at least one unit serial".into());
    }
    Ok((units, golden_path(console, &form.image)?))
}

/// Make a factory batch: every unit registered with its manufacturing
/// record and its personalized image, kept where the device page offers it.
pub async fn run_batch(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Form(form): Form<BatchForm>,
) -> Result<Response, Failure> {
    let (units, golden) = match check_batch(&console, &form) {
        Ok(c) => c,
        Err(e) => return refused_form(&console, &op, &e).await,
    };
    let operator = op.name.clone();
    let image_name = form.image.clone();
    let report = with_store(&console, move |home, store| {
        let run = FactoryRun {
            units,
            output: FactoryOutput::Image {
                golden,
                partition: None,
            },
            out: home.root().join("console").join("images"),
            station: "console".into(),
            operator: format!("operator:{operator}"),
            validity_days: edgebind_certs::profile::default_days::DEVICE,
            broker: None,
            reissue: false,
        };
        let mut report = ops::factory::run(home, store, &run, |_| {})?;
        // The device page offers `<id>.img`, whatever the golden image's name.
        for u in &mut report.units {
            let want = image_path(home, &u.device);
            if let Some(made) = u.output.as_mut().filter(|p| **p != want) {
                std::fs::rename(&*made, &want).map_err(|source| OpsError::Io {
                    path: want.clone(),
                    source,
                })?;
                *made = want;
            }
        }
        crate::handlers::audit(
            store,
            &operator,
            "factory.run",
            "",
            &format!(
                "{} unit(s) from {image_name}: {} made, {} skipped, {} failed",
                report.units.len(),
                report.made,
                report.skipped,
                report.failed
            ),
        );
        Ok(report)
    })
    .await
    .map_err(|e| e.for_operator(&op))?;
    let status = if report.all_done() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    Ok((status, batch_result(&op, &report)).into_response())
}

fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Made => "made",
        Outcome::Reissued => "made again",
        Outcome::Skipped => "already made: skipped",
        Outcome::Failed => "failed",
        Outcome::NotAttempted => "not attempted",
    }
}

fn batch_result(op: &Operator, report: &FactoryReport) -> Markup {
    layout(
        op,
        "Factory batch",
        html! {
            h1 { "Factory batch: results" }
            p #batch-summary {
                (report.made) " made, " (report.skipped) " already made (skipped), "
                (report.failed) " failed"
            }
            @if let Some(why) = &report.stopped { div.error role="alert" { (why) } }
            table #batch-units {
                thead { tr { th { "Serial" } th { "Device" } th { "Result" } th { "Image" } } }
                tbody {
                    @for u in &report.units {
                        tr data-unit=(u.serial) {
                            td.mono { (u.serial) }
                            td { a href={"/devices/" (u.device)} { (u.device) } }
                            td {
                                (outcome_label(u.outcome))
                                @if let Some(c) = &u.cert_serial { ", certificate serial " span.mono { (c) } }
                                @if let Some(e) = &u.error { ": " (e) }
                            }
                            td { @if u.output.is_some() {
                                a.image href={"/devices/" (u.device) "/image"} download { (u.device) ".img" }
                            } @else { span.muted { "none" } } }
                        }
                    }
                }
            }
            p { a href="/factory" { "The factory page and its manufacturing records" } }
        },
    )
}

/// Where the console keeps a claim batch's image.
pub(crate) fn claim_image_path(home: &FleetHome, batch: &DeviceId) -> PathBuf {
    home.root()
        .join("console")
        .join("claims")
        .join(format!("{batch}.img"))
}

#[derive(Deserialize)]
pub struct ClaimImageForm {
    image: String,
}

/// Make the claim batch's image: a new claim identity and its claim bundle
/// (`ops::claim::claim_identity`, as `factory claim-identity` issues it)
/// on a copy of the golden image. Making it again issues a new claim
/// certificate; the earlier one stays valid until it expires or is revoked.
pub async fn make_claim_image(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(batch): Path<String>,
    Form(form): Form<ClaimImageForm>,
) -> Result<Response, Failure> {
    let err = |e: Failure| e.for_operator(&op);
    let batch = DeviceId::new(&batch).map_err(|e| err(e.into()))?;
    let golden = golden_path(&console, &form.image)
        .map_err(|e| err(Failure::new(StatusCode::BAD_REQUEST, e)))?;
    let (operator, target, image_name) = (op.name.clone(), batch.clone(), form.image.clone());
    let made = with_store(&console, move |home, store| {
        if store.claim_serials(&target)?.is_empty() {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                format!("no claim batch {target}: allow its serials first"),
            ));
        }
        let made = claim_image(home, &target, &golden)?;
        crate::handlers::audit(
            store,
            &operator,
            "factory.claim-image",
            &format!("claim:{target}"),
            &format!(
                "image from {image_name}, claim certificate serial {}",
                made.serial
            ),
        );
        Ok(made)
    })
    .await
    .map_err(err)?;
    console.sessions.flash(
        &op,
        format!(
            "claim image of batch {batch} made from {} (claim certificate serial {}, provisioning port {})",
            form.image, made.serial, made.provisioning_port
        ),
    );
    Ok(Redirect::to(&format!("/factory/claims/{batch}")).into_response())
}

/// Issue `batch`'s claim bundle into `<home>/console/claims/` (replacing
/// the previous one) and write it onto a copy of `golden`. If the image
/// cannot be written, the new claim certificate is revoked.
fn claim_image(
    home: &FleetHome,
    batch: &DeviceId,
    golden: &std::path::Path,
) -> Result<ops::claim::ClaimIdentity, OpsError> {
    let image = claim_image_path(home, batch);
    let dir = image.parent().expect("under console/claims").to_owned();
    std::fs::create_dir_all(&dir).map_err(|source| OpsError::Io {
        path: dir.clone(),
        source,
    })?;
    let out = dir.join(format!("{batch}.bundle"));
    let tar = edgebind_certs::bundle::tar_path_for(&out);
    for old in [&out, &tar] {
        let gone = if old.is_dir() {
            std::fs::remove_dir_all(old)
        } else {
            std::fs::remove_file(old)
        };
        if let Err(source) = gone
            && source.kind() != std::io::ErrorKind::NotFound
        {
            return Err(OpsError::Io {
                path: old.clone(),
                source,
            });
        }
    }
    let made = ops::claim::claim_identity(
        home,
        &ops::claim::ClaimIdentityRequest {
            batch: batch.clone(),
            validity_days: edgebind_certs::profile::default_days::CLAIM,
            broker: None,
            provisioning_port: None,
            serial: SerialSource::File(CLAIM_SERIAL_FILE.into()),
            out,
        },
    )?;
    let written = std::fs::read(&made.tar)
        .map_err(|source| OpsError::Io {
            path: made.tar.clone(),
            source,
        })
        .and_then(|bytes| ops::write_image(golden, None, &image, &bytes));
    if let Err(e) = written {
        let revoked = home
            .open_pki()
            .and_then(|pki| Ok(pki.revoke_serial(&made.serial)?));
        return Err(match revoked {
            Ok(_) => e,
            Err(r) => OpsError::RollbackFailed {
                what: format!("revoking serial {} of {}", made.serial, made.principal),
                cause: Box::new(e),
                rollback: r.to_string(),
            },
        });
    }
    Ok(made)
}

/// The claim batch's image.
pub async fn claim_image_download(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(batch): Path<String>,
) -> Result<Response, Failure> {
    let batch = DeviceId::new(&batch).map_err(|e| Failure::from(e).for_operator(&op))?;
    crate::handlers::download(
        claim_image_path(&console.config.home, &batch),
        format!("claim-{batch}.img"),
        "claim image for this batch: make it on the batch's page",
    )
    .await
    .map_err(|e| e.for_operator(&op))
}

/// The factory page again, with what was wrong with the submitted form.
async fn refused_form(console: &Shared, op: &Operator, error: &str) -> Result<Response, Failure> {
    let records = with_store(console, |_, store| Ok(store.manufacturing_records()?))
        .await
        .map_err(|e| e.for_operator(op))?;
    Ok((
        StatusCode::BAD_REQUEST,
        factory_page(op, &records, &golden_images(console), Some(error)),
    )
        .into_response())
}
