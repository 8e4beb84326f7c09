//! The JSON API under `/api/`: what the console's pages do, for scripts and
//! other systems, through the same functions (`fleet::ops` and the
//! registry's reads, audited alike). Its OpenAPI description is generated
//! from this module's types and handler annotations (utoipa) and served at
//! [`OPENAPI_PATH`].
//!
//! # Authentication: a bearer token from a login code
//!
//! A script exchanges a single-use code from `edgebind console login
//! --operator NAME` at `POST /api/session` for a bearer token and sends it
//! as `Authorization: Bearer TOKEN`. It is a console session like a
//! browser's (same expiry, same operator, same audit), only presented in a
//! header instead of a cookie: a browser never adds that header by itself,
//! so requests with it need no CSRF token, and a bearer session is refused
//! when presented as a cookie (and the reverse). Why not long-lived API
//! keys: the code needs the fleet home, as for a browser, and nothing that
//! outlives a session is stored anywhere. The console's own pages may also
//! call the API with their session cookie and the `x-csrf-token` header.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use edgebind_fleet::registry::rules::PresenceView;
use edgebind_fleet::registry::{AuditEntry, CommandRecord, Device};
use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::{Action, now_unix};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use crate::Console;
use crate::auth::{self, Operator};
use crate::handlers::{self, Failure, ListQuery};

type Shared = Arc<Console>;

/// Where the OpenAPI description is served (no session needed: it holds
/// no fleet data).
pub const OPENAPI_PATH: &str = "/api/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Edgebind console API",
        description = "The onboarding console's operations as JSON. Authenticate with \
            `POST /api/session` (a single-use code from `edgebind console login --operator NAME`) \
            and send the token as `Authorization: Bearer TOKEN`."
    ),
    paths(
        create_session, delete_session, list_devices, get_device, add_devices, send_command,
        set_settings, revoke_device, overview, audit_log
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes that need a session (mounted behind `require_session`).
pub fn private_routes() -> Router<Shared> {
    use axum::routing::{delete, get, post};
    Router::new()
        .route("/api/session", delete(delete_session))
        .route("/api/devices", get(list_devices).post(add_devices))
        .route("/api/devices/{id}", get(get_device))
        .route("/api/devices/{id}/commands", post(send_command))
        .route("/api/devices/{id}/settings", post(set_settings))
        .route("/api/devices/{id}/revoke", post(revoke_device))
        .route("/api/overview", get(overview))
        .route("/api/audit", get(audit_log))
}

/// The routes open without a session.
pub fn public_routes() -> Router<Shared> {
    use axum::routing::{get, post};
    Router::new()
        .route("/api/session", post(create_session))
        .route(OPENAPI_PATH, get(openapi))
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// An API error: its status and `{"error": "..."}`.
#[derive(Serialize, ToSchema)]
pub struct ApiError {
    /// What went wrong, in words.
    error: String,
}

pub struct ApiFailure(Failure);

impl From<Failure> for ApiFailure {
    fn from(f: Failure) -> Self {
        ApiFailure(f)
    }
}

fn bad(message: impl Into<String>) -> ApiFailure {
    ApiFailure(Failure::new(StatusCode::BAD_REQUEST, message))
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (
            self.0.status,
            Json(ApiError {
                error: self.0.message,
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiFailure>;

fn device_id(id: &str) -> Result<DeviceId, ApiFailure> {
    DeviceId::new(id).map_err(|e| bad(e.to_string()))
}

#[derive(Deserialize, ToSchema)]
pub struct SessionRequest {
    /// The single-use code printed by `edgebind console login --operator NAME`.
    code: String,
}

#[derive(Serialize, ToSchema)]
pub struct SessionToken {
    /// Send as `Authorization: Bearer TOKEN`.
    token: String,
    /// The operator the session acts as (`operator:NAME` in the audit log).
    operator: String,
    /// Seconds until the session expires.
    expires_in_s: u64,
}

/// Exchange a login code for a bearer token.
#[utoipa::path(post, path = "/api/session", request_body = SessionRequest, security(()),
    responses(
        (status = 200, body = SessionToken),
        (status = 403, description = "code unknown, already used or expired", body = ApiError),
        (status = 429, description = "too many failed logins lately", body = ApiError),
    ))]
async fn create_session(
    State(console): State<Shared>,
    Json(req): Json<SessionRequest>,
) -> ApiResult<SessionToken> {
    match auth::redeem(&console, req.code, true).await {
        Ok((operator, token)) => Ok(Json(SessionToken {
            token,
            operator,
            expires_in_s: console.config.session_ttl.as_secs(),
        })),
        Err(auth::Refused::Limited) => Err(ApiFailure(Failure::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed logins: wait a minute",
        ))),
        Err(auth::Refused::Code) => Err(ApiFailure(Failure::new(
            StatusCode::FORBIDDEN,
            "login code refused: unknown, already used or expired",
        ))),
        Err(auth::Refused::Internal(e)) => Err(ApiFailure(Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e,
        ))),
    }
}

/// End this session (log out).
#[utoipa::path(delete, path = "/api/session", responses((status = 204)))]
async fn delete_session(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
) -> StatusCode {
    auth::end_session(&console, &op).await;
    StatusCode::NO_CONTENT
}

/// One device as the listing shows it.
#[derive(Serialize, ToSchema)]
pub struct DeviceSummary {
    id: String,
    board: String,
    tags: Vec<String>,
    /// `registered`, `provisioned` or `revoked`.
    lifecycle: String,
    /// `online`, `offline`, `never_seen` or `revoked`.
    state: String,
    online: bool,
    /// No fleet service has kept presence up to date lately.
    presence_stale: bool,
    /// Unix seconds.
    last_seen: Option<u64>,
    agent_version: Option<String>,
    /// When its certificate expires (Unix seconds).
    cert_not_after: Option<u64>,
    desired_revision: u64,
    /// The device reported the latest desired revision applied.
    converged: bool,
}

fn summary(d: &Device, view: PresenceView) -> DeviceSummary {
    DeviceSummary {
        id: d.id.to_string(),
        board: d.board.to_string(),
        tags: d.tags.iter().map(|t| t.to_string()).collect(),
        lifecycle: d.lifecycle.as_str().to_owned(),
        state: d.presence_state().key().replace('-', "_"),
        online: d.online,
        presence_stale: !view.fresh,
        last_seen: d.last_seen,
        agent_version: d.agent_version.clone(),
        cert_not_after: d.cert.as_ref().map(|c| c.not_after),
        desired_revision: d.desired_revision,
        converged: d.converged(),
    }
}

#[derive(Serialize, ToSchema)]
pub struct DeviceList {
    devices: Vec<DeviceSummary>,
    /// Pass as `after` for the next page; absent on the last page.
    next_after: Option<String>,
}

/// One page of devices, filtered and paged by the registry (by id).
#[utoipa::path(get, path = "/api/devices", params(ListQuery),
    responses((status = 200, body = DeviceList), (status = 400, body = ApiError)))]
async fn list_devices(
    State(console): State<Shared>,
    Query(q): Query<ListQuery>,
) -> ApiResult<DeviceList> {
    let (page, view) = handlers::list(&console, &q).await?;
    Ok(Json(DeviceList {
        devices: page.devices.iter().map(|d| summary(d, view)).collect(),
        next_after: page.next_after.map(|a| a.to_string()),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Certificate {
    serial: String,
    fingerprint_sha256: String,
    not_after: u64,
}

#[derive(Serialize, ToSchema)]
pub struct ReportedSettings {
    revision: u64,
    #[schema(value_type = Object)]
    applied: Map<String, Value>,
    #[schema(value_type = Object)]
    ignored: Map<String, Value>,
}

#[derive(Serialize, ToSchema)]
pub struct CommandEntry {
    id: String,
    action: Option<String>,
    #[schema(value_type = Object)]
    args: Map<String, Value>,
    /// `queued`, `sent`, `accepted`, `succeeded`, `failed` or `rejected`.
    state: String,
    requested_by: Option<String>,
    created_at: u64,
    finished_at: Option<u64>,
    reason: Option<String>,
    #[schema(value_type = Option<Object>)]
    output: Option<Value>,
}

fn command_entry(c: &CommandRecord) -> CommandEntry {
    CommandEntry {
        id: c.id.to_string(),
        action: c.action.clone(),
        args: c.args.clone(),
        state: c.state.as_str().to_owned(),
        requested_by: c.requested_by.clone(),
        created_at: c.created_at,
        finished_at: c.finished_at,
        reason: c.reason.clone(),
        output: c.output.clone(),
    }
}

#[derive(Serialize, ToSchema)]
pub struct DeviceDetail {
    #[serde(flatten)]
    summary: DeviceSummary,
    registered_at: u64,
    connected_at: Option<u64>,
    addresses: Vec<String>,
    cert: Option<Certificate>,
    #[schema(value_type = Object)]
    desired: Map<String, Value>,
    reported: Option<ReportedSettings>,
    /// What the agent last reported of itself (actions it offers with their arguments…).
    #[schema(value_type = Option<Object>)]
    inventory: Option<Value>,
    /// The latest telemetry sample.
    #[schema(value_type = Option<Object>)]
    telemetry: Option<Value>,
    /// The actions the console offers for it.
    actions: Vec<String>,
    /// Latest first.
    commands: Vec<CommandEntry>,
    /// Connects and disconnects, latest first.
    presence_history: Vec<PresenceEntry>,
}

#[derive(Serialize, ToSchema)]
pub struct PresenceEntry {
    /// Unix seconds.
    at: u64,
    /// `true`: a new connection; `false`: it ended.
    online: bool,
}

/// One device: identity, presence, settings, inventory, commands.
#[utoipa::path(get, path = "/api/devices/{id}", params(("id" = String, Path, description = "device id")),
    responses((status = 200, body = DeviceDetail), (status = 404, body = ApiError)))]
async fn get_device(
    State(console): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<DeviceDetail> {
    let now = handlers::device_state(&console, device_id(&id)?).await?;
    let (d, view) = (&now.device, now.view);
    Ok(Json(DeviceDetail {
        summary: summary(d, view),
        registered_at: d.registered_at,
        connected_at: d.connected_at,
        addresses: d.addresses.clone(),
        cert: d.cert.as_ref().map(|c| Certificate {
            serial: c.serial.clone(),
            fingerprint_sha256: c.fingerprint_sha256.clone(),
            not_after: c.not_after,
        }),
        desired: d.desired.clone(),
        reported: d.reported.as_ref().map(|r| ReportedSettings {
            revision: r.revision,
            applied: r.applied.clone(),
            ignored: r.ignored.clone(),
        }),
        actions: handlers::offered_actions(d.inventory.as_ref()),
        inventory: d.inventory.clone(),
        telemetry: d.telemetry.clone(),
        commands: now.commands.iter().map(command_entry).collect(),
        presence_history: now
            .presence
            .iter()
            .map(|p| PresenceEntry {
                at: p.at,
                online: p.online,
            })
            .collect(),
    }))
}

#[derive(Deserialize, ToSchema)]
pub struct NewDevices {
    /// A known board (`raspberrypi3-64`, `qemux86-64`…).
    board: String,
    #[serde(default)]
    tags: Vec<String>,
    /// Initial desired settings, checked by the agent's own rules first.
    #[serde(default)]
    #[schema(value_type = Object)]
    settings: Map<String, Value>,
    /// One or more device ids.
    ids: Vec<String>,
    /// A golden image of `--images DIR` to personalize for each device.
    image: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Added {
    id: String,
    /// Whether it was registered (a failed one left nothing behind).
    registered: bool,
    /// What was done, or why not.
    detail: String,
    /// Where its identity bundle (tar) downloads.
    bundle: Option<String>,
    /// Where its personalized image downloads.
    image: Option<String>,
}

/// Register devices: each one completely or not at all.
#[utoipa::path(post, path = "/api/devices", request_body = NewDevices,
    responses(
        (status = 200, description = "one result per id", body = Vec<Added>),
        (status = 400, description = "nothing registered: the request is wrong", body = ApiError),
    ))]
async fn add_devices(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Json(req): Json<NewDevices>,
) -> ApiResult<Vec<Added>> {
    let checked = handlers::check_add_parts(
        &console,
        &req.board,
        req.tags.iter().map(String::as_str),
        req.settings,
        req.ids.iter().map(String::as_str),
        req.image.as_deref(),
    )
    .map_err(bad)?;
    let rows = handlers::add_devices(&console, &op, checked).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| {
                let ok = r.result.is_ok();
                Added {
                    bundle: ok.then(|| format!("/devices/{}/bundle.tar", r.id)),
                    image: r.image.then(|| format!("/devices/{}/image", r.id)),
                    detail: match r.result {
                        Ok(m) | Err(m) => m,
                    },
                    registered: ok,
                    id: r.id,
                }
            })
            .collect(),
    ))
}

#[derive(Deserialize, ToSchema)]
pub struct NewCommand {
    /// `ping`, `reboot`, `inventory`, or an action the device declares.
    action: String,
    /// Checked against the arguments the device declares for it.
    #[serde(default)]
    #[schema(value_type = Object)]
    args: Map<String, Value>,
}

#[derive(Serialize, ToSchema)]
pub struct QueuedCommand {
    device: String,
    /// Its id: follow its state in `GET /api/devices/{id}` (`commands`).
    command: String,
    state: String,
}

/// Send an action: queued for the fleet service, which delivers it at once
/// to an online device; expires after the console's send timeout.
#[utoipa::path(post, path = "/api/devices/{id}/commands", request_body = NewCommand,
    params(("id" = String, Path, description = "device id")),
    responses((status = 200, body = Vec<QueuedCommand>), (status = 400, body = ApiError),
        (status = 404, body = ApiError)))]
async fn send_command(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    Json(req): Json<NewCommand>,
) -> ApiResult<Vec<QueuedCommand>> {
    let id = device_id(&id)?;
    let action: Action = req.action.parse().map_err(bad)?;
    let queued = handlers::send_action(&console, &op, id, action, req.args).await?;
    Ok(Json(
        queued
            .into_iter()
            .map(|c| QueuedCommand {
                device: c.device.to_string(),
                command: c.command.to_string(),
                state: c.state.to_owned(),
            })
            .collect(),
    ))
}

#[derive(Deserialize, ToSchema)]
pub struct SettingsChange {
    /// Keys to set; `null` removes one. Checked by the agent's own rules.
    #[schema(value_type = Object)]
    settings: Map<String, Value>,
}

#[derive(Serialize, ToSchema)]
pub struct DesiredSettings {
    revision: u64,
    #[schema(value_type = Object)]
    settings: Map<String, Value>,
    /// Keys no agent is known to understand (the device reports them ignored).
    unknown_keys: Vec<String>,
}

/// Change desired settings (the fleet service publishes them).
#[utoipa::path(post, path = "/api/devices/{id}/settings", request_body = SettingsChange,
    params(("id" = String, Path, description = "device id")),
    responses((status = 200, body = DesiredSettings), (status = 400, body = ApiError),
        (status = 404, body = ApiError)))]
async fn set_settings(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    Json(req): Json<SettingsChange>,
) -> ApiResult<DesiredSettings> {
    let done = handlers::set_settings(&console, &op, device_id(&id)?, req.settings).await?;
    Ok(Json(DesiredSettings {
        revision: done.desired.revision,
        settings: done.desired.settings,
        unknown_keys: done.unknown_keys.into_iter().collect(),
    }))
}

#[derive(Deserialize, ToSchema)]
pub struct RevokeRequest {
    /// The device id again: the confirmation.
    confirm: String,
}

#[derive(Serialize, ToSchema)]
pub struct RevokeDone {
    /// Certificates put on the CRL.
    certificates: usize,
    /// Queued commands that can never be delivered now, rejected.
    dropped_commands: usize,
    /// Whether the broker reloaded its ACL and CRL (else they apply at its next start).
    broker_reloaded: bool,
    /// What was done, in words.
    message: String,
}

/// Revoke a device: its certificates on the CRL, revoked in the registry,
/// queued commands dropped, the broker reloaded. It cannot be undone.
#[utoipa::path(post, path = "/api/devices/{id}/revoke", request_body = RevokeRequest,
    params(("id" = String, Path, description = "device id")),
    responses((status = 200, body = RevokeDone), (status = 400, body = ApiError),
        (status = 404, body = ApiError)))]
async fn revoke_device(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    Json(req): Json<RevokeRequest>,
) -> ApiResult<RevokeDone> {
    let id = device_id(&id)?;
    let done = handlers::revoke_device(&console, &op, id.clone(), &req.confirm).await?;
    Ok(Json(RevokeDone {
        certificates: done.certificates.len(),
        dropped_commands: done.dropped_commands,
        broker_reloaded: handlers::broker_reloaded(&done),
        message: handlers::revoked_message(&id, &done),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct FleetOverview {
    total: u64,
    online: u64,
    offline: u64,
    never_seen: u64,
    revoked: u64,
    /// Certificates that expire within `expiry_warning_days`.
    cert_expiring: u64,
    expiry_warning_days: u64,
    /// Devices that have not reported their latest desired settings applied.
    settings_pending: u64,
    presence_stale: bool,
}

/// Counts by presence and lifecycle, and what needs attention.
#[utoipa::path(get, path = "/api/overview", responses((status = 200, body = FleetOverview)))]
async fn overview(State(console): State<Shared>) -> ApiResult<FleetOverview> {
    let days = handlers::EXPIRY_WARNING_DAYS;
    let soon = now_unix() + days * 86_400;
    let (o, view) = handlers::with_store(&console, move |_, store| {
        Ok((store.overview(soon)?, handlers::presence(store)?))
    })
    .await?;
    Ok(Json(FleetOverview {
        total: o.total,
        online: o.online,
        offline: o.offline,
        never_seen: o.never_seen,
        revoked: o.revoked,
        cert_expiring: o.cert_expiring,
        expiry_warning_days: days,
        settings_pending: o.settings_pending,
        presence_stale: !view.fresh,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Entries before this sequence number (the next page).
    before: Option<i64>,
    /// At most this many (default 100, at most 1000).
    limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditLine {
    seq: i64,
    at: u64,
    actor: String,
    action: String,
    target: String,
    detail: String,
}

/// The audit log, latest first.
#[utoipa::path(get, path = "/api/audit", params(AuditQuery),
    responses((status = 200, body = Vec<AuditLine>)))]
async fn audit_log(
    State(console): State<Shared>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Vec<AuditLine>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let entries = handlers::with_store(&console, move |_, store| {
        Ok(store.audit_log(limit, q.before)?)
    })
    .await?;
    Ok(Json(
        entries
            .into_iter()
            .map(|e: AuditEntry| AuditLine {
                seq: e.seq,
                at: e.at,
                actor: e.actor,
                action: e.action,
                target: e.target,
                detail: e.detail,
            })
            .collect(),
    ))
}
