//! The console's routes: each parses its form or query, calls
//! `edgebind_fleet::ops` or a registry read on a blocking thread, and
//! renders the result.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form};
use edgebind_fleet::ops::{
    self, FleetHome, IdentityOutput, Mode, OpsError, Registration, SendRequest, Sent, Targets,
};
use edgebind_fleet::registry::rules::PresenceView;
use edgebind_fleet::registry::{
    Board, CommandRecord, DeviceQuery, PresenceChange, PresenceState, RegistryError, Store, Tag,
    parse_args, parse_setting, rules,
};
use edgebind_protocol::messages::{Action, Inventory, now_unix};
use edgebind_protocol::{DeviceId, Principal, actions};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::auth::{self, Operator};
use crate::{Console, assets, pages};

type Shared = Arc<Console>;

pub fn routes(console: Shared) -> Router {
    let private = Router::new()
        .route("/", get(overview))
        .route("/devices", get(devices))
        .route("/devices/rows", get(device_rows))
        .route("/devices/{id}", get(device))
        .route("/devices/{id}/live", get(device_live))
        .route("/live/devices", get(live_rows))
        .route("/live/devices/{id}", get(live_device))
        .route("/devices/{id}/send", post(send))
        .route("/devices/{id}/settings", post(settings))
        .route("/devices/{id}/revoke", post(revoke))
        .route("/devices/{id}/bundle.tar", get(bundle))
        .route("/devices/{id}/image", get(image))
        .route("/add", get(add_form).post(add))
        .route("/factory", get(crate::factory::page))
        .route("/factory/claims", post(crate::factory::claim))
        .route("/factory/claims/{batch}", get(crate::factory::batch))
        .route(
            "/factory/claims/{batch}/identity.tar",
            get(crate::factory::identity),
        )
        .route(
            "/factory/claims/{batch}/image",
            get(crate::factory::claim_image_download).post(crate::factory::make_claim_image),
        )
        .route("/factory/batches", post(crate::factory::run_batch))
        .route("/audit", get(audit_page))
        .route("/logout", post(auth::logout))
        .merge(crate::api::private_routes())
        .layer(middleware::from_fn_with_state(
            console.clone(),
            auth::require_session,
        ));
    Router::new()
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/assets/console.css", get(assets::css))
        .route("/assets/console.js", get(assets::js))
        .merge(crate::api::public_routes())
        .merge(private)
        .layer(middleware::map_response(security_headers))
        .layer(middleware::from_fn(server_timing))
        .with_state(console)
}

/// How long the console took to answer (until the response headers: a
/// stream's or a download's body is not counted), as `Server-Timing`: the
/// browser's developer tools show it, and `bench_console` reads it.
async fn server_timing(req: axum::extract::Request, next: middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let mut res = next.run(req).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = format!("app;dur={ms:.2}").parse() {
        res.headers_mut().insert("server-timing", v);
    }
    res
}

/// No framing, no sniffing, no referrer, scripts and styles only from the
/// console itself, pages not cached (they show live state).
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    for (k, v) in [
        (
            "content-security-policy",
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("strict-transport-security", "max-age=31536000"),
        ("cache-control", "no-store"),
    ] {
        h.insert(k, v.parse().expect("static header value"));
    }
    res
}

/// What a handler fails with: a page that says what went wrong.
pub struct Failure {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    operator: Option<Box<Operator>>,
}

impl Failure {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
            operator: None,
        }
    }

    pub(crate) fn for_operator(mut self, op: &Operator) -> Self {
        self.operator = Some(Box::new(op.clone()));
        self
    }
}

impl From<OpsError> for Failure {
    fn from(e: OpsError) -> Self {
        let status = match &e {
            OpsError::Registry(RegistryError::UnknownDevice(_)) => StatusCode::NOT_FOUND,
            OpsError::Registry(RegistryError::Backend { .. }) | OpsError::Io { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::BAD_REQUEST,
        };
        Failure::new(status, e.to_string())
    }
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        OpsError::from(e).into()
    }
}

impl From<edgebind_protocol::IdError> for Failure {
    fn from(e: edgebind_protocol::IdError) -> Self {
        Failure::new(StatusCode::BAD_REQUEST, e.to_string())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.status,
            pages::error_page(self.operator.as_deref(), &self.message),
        )
            .into_response()
    }
}

/// Run `f` with the console's registry on a blocking thread.
pub(crate) async fn with_store<T: Send + 'static>(
    console: &Shared,
    f: impl FnOnce(&FleetHome, &mut dyn Store) -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    let c = console.clone();
    tokio::task::spawn_blocking(move || {
        let mut store = c.store.lock().unwrap_or_else(|p| p.into_inner());
        f(&c.config.home, store.as_mut())
    })
    .await
    .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// Record a completed change in the audit log as `operator:NAME`; a failure
/// to record is logged (the change itself is done).
pub(crate) fn audit(
    store: &mut dyn Store,
    operator: &str,
    action: &str,
    target: &str,
    detail: &str,
) {
    let actor = format!("operator:{operator}");
    if let Err(e) = ops::audit::record(store, &actor, action, target, detail) {
        tracing::error!("console: {action} {target} by {actor} done but not in the audit log: {e}");
    }
}

pub(crate) async fn audit_later(
    console: &Shared,
    operator: &str,
    action: &str,
    target: &str,
    detail: String,
) {
    let (operator, action, target) = (operator.to_owned(), action.to_owned(), target.to_owned());
    let _ = with_store(console, move |_, store| {
        audit(store, &operator, &action, &target, &detail);
        Ok(())
    })
    .await;
}

pub(crate) fn presence(store: &dyn Store) -> Result<PresenceView, Failure> {
    Ok(rules::presence_view(&store.services()?, now_unix()))
}

/// The device listing's filters (pages and API alike).
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only devices with this tag.
    #[serde(default)]
    pub(crate) tag: String,
    /// `online`, `offline`, `never-seen` or `revoked`.
    #[serde(default)]
    pub(crate) state: String,
    /// Part of the device id.
    #[serde(default)]
    pub(crate) q: String,
    /// The page after this device id (`next_after` of the previous page).
    #[serde(default)]
    pub(crate) after: String,
    /// Devices per page (default 50).
    pub(crate) limit: Option<u32>,
}

impl ListQuery {
    pub(crate) fn to_query(&self) -> Result<DeviceQuery, Failure> {
        let bad = |e: String| Failure::new(StatusCode::BAD_REQUEST, e);
        let mut query = DeviceQuery {
            tag: non_empty(&self.tag)
                .map(str::parse::<Tag>)
                .transpose()
                .map_err(|e| bad(e.to_string()))?,
            search: non_empty(&self.q).map(str::to_owned),
            after: non_empty(&self.after).map(DeviceId::new).transpose()?,
            limit: self.limit.unwrap_or(50),
            ..DeviceQuery::default()
        };
        if let Some(s) = non_empty(&self.state) {
            PresenceState::from_key(s)
                .ok_or_else(|| bad(format!("unknown state {s:?}")))?
                .narrow(&mut query);
        }
        Ok(query)
    }

    /// The filters as a query string (without `after`).
    fn query_string(&self) -> String {
        serde_urlencoded::to_string([
            ("tag", self.tag.as_str()),
            ("state", self.state.as_str()),
            ("q", self.q.as_str()),
            ("limit", &self.limit.unwrap_or(50).to_string()),
        ])
        .unwrap_or_default()
    }
}

pub(crate) fn non_empty(s: &str) -> Option<&str> {
    Some(s.trim()).filter(|s| !s.is_empty())
}

pub(crate) async fn list(
    console: &Shared,
    q: &ListQuery,
) -> Result<(edgebind_fleet::registry::DevicePage, PresenceView), Failure> {
    let query = q.to_query()?;
    with_store(console, move |_, store| {
        Ok((store.list_devices(&query)?, presence(store)?))
    })
    .await
}

async fn devices(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Query(q): Query<ListQuery>,
) -> Result<Response, Failure> {
    let (page, view) = list(&console, &q).await.map_err(|e| e.for_operator(&op))?;
    let filters = pages::ListFilters {
        tag: &q.tag,
        state: &q.state,
        q: &q.q,
        limit: q.limit.unwrap_or(50),
        query: q.query_string(),
    };
    Ok(pages::devices(&op, &filters, &page, view).into_response())
}

async fn device_rows(
    State(console): State<Shared>,
    Query(q): Query<ListQuery>,
) -> Result<Response, Failure> {
    let (page, view) = list(&console, &q).await?;
    Ok(pages::device_rows(&page, view).into_response())
}

/// The device table, live (see [`crate::live`]).
async fn live_rows(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Query(q): Query<ListQuery>,
) -> Result<Response, Failure> {
    // A bad filter is refused once, here, not on every tick.
    q.to_query()?;
    let c = console.clone();
    let q = Arc::new(q);
    Ok(crate::live::region(console, op, move || {
        let (c, q) = (c.clone(), q.clone());
        async move {
            let (page, view) = list(&c, &q).await?;
            Ok::<_, Failure>(vec![(
                "device-list",
                pages::device_rows(&page, view).into_string(),
            )])
        }
    }))
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

/// Commands shown on a device page (latest first).
const DEVICE_COMMANDS: u32 = 20;

/// Connection changes shown on a device page (latest first).
const DEVICE_PRESENCE: u32 = 20;

/// What a device page shows that changes while it is open.
pub(crate) struct DeviceNow {
    pub device: edgebind_fleet::registry::Device,
    pub view: PresenceView,
    pub commands: Vec<CommandRecord>,
    pub presence: Vec<PresenceChange>,
}

pub(crate) async fn device_state(console: &Shared, id: DeviceId) -> Result<DeviceNow, Failure> {
    with_store(console, move |_, store| {
        Ok(DeviceNow {
            device: store.device(&id)?,
            view: presence(store)?,
            commands: store.commands_for(&id, DEVICE_COMMANDS)?,
            presence: store.presence_history(&id, DEVICE_PRESENCE)?,
        })
    })
    .await
}

/// A device page's presence, settings and commands, live.
async fn live_device(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id = DeviceId::new(&id)?;
    // An unknown device is a 404 once, not an empty stream.
    device_state(&console, id.clone()).await?;
    let c = console.clone();
    Ok(crate::live::region(console, op, move || {
        let (c, id) = (c.clone(), id.clone());
        async move {
            let now = device_state(&c, id).await?;
            Ok::<_, Failure>(vec![
                (
                    "live",
                    pages::device_live(&now.device, now.view).into_string(),
                ),
                ("commands", pages::commands(&now.commands).into_string()),
                (
                    "presence-history",
                    pages::presence_history(&now.presence).into_string(),
                ),
            ])
        }
    }))
}

/// Where the console keeps the personalized image of a device.
pub(crate) fn image_path(home: &FleetHome, id: &DeviceId) -> std::path::PathBuf {
    home.root()
        .join("console")
        .join("images")
        .join(format!("{id}.img"))
}

pub(crate) fn offered_actions(inventory: Option<&Value>) -> Vec<String> {
    let declared: Vec<String> = inventory
        .and_then(|v| serde_json::from_value::<Inventory>(v.clone()).ok())
        .map(|inv| {
            inv.actions
                .iter()
                .map(|a| a.name.as_str().to_owned())
                .collect()
        })
        .unwrap_or_default();
    if declared.is_empty() {
        [
            actions::PING,
            actions::INVENTORY,
            actions::REBOOT,
            actions::RESTART_AGENT,
        ]
        .iter()
        .map(|a| a.as_str().to_owned())
        .collect()
    } else {
        declared
    }
}

async fn device(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let err = |e: Failure| e.for_operator(&op);
    let id = DeviceId::new(&id).map_err(|e| err(e.into()))?;
    let now = device_state(&console, id.clone()).await.map_err(err)?;
    let telemetry = with_store(&console, {
        let id = id.clone();
        move |_, store| Ok(store.telemetry_history(&id, 20)?)
    })
    .await
    .map_err(err)?;
    let image = image_path(&console.config.home, &id)
        .metadata()
        .ok()
        .map(|m| format!("{} MiB", m.len() >> 20));
    let v = pages::DeviceView {
        actions: offered_actions(now.device.inventory.as_ref()),
        inventory: now
            .device
            .inventory
            .as_ref()
            .and_then(|v| serde_json::from_value::<Inventory>(v.clone()).ok()),
        device: &now.device,
        view: now.view,
        telemetry: &telemetry,
        commands: &now.commands,
        presence: &now.presence,
        image,
    };
    Ok(pages::device(&op, &v).into_response())
}

async fn device_live(
    State(console): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id = DeviceId::new(&id)?;
    let now = device_state(&console, id).await?;
    Ok(pages::device_live(&now.device, now.view).into_response())
}

/// `key=value` lines (blank lines skipped).
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty())
}

fn parse_settings(text: &str) -> Result<Map<String, Value>, Failure> {
    let mut changes = Map::new();
    for line in lines(text) {
        let (k, v) = parse_setting(line)?;
        changes.insert(k, v);
    }
    Ok(changes)
}

#[derive(Deserialize)]
pub struct SendForm {
    action: String,
    #[serde(default)]
    args: String,
}

/// The identity the console sends with for this operator: the home's
/// operator identity when it is this operator's, else the operator's own
/// (issued from the PKI into `<home>/identities/` on first use).
fn operator_identity(home: &FleetHome, name: &str) -> Result<std::path::PathBuf, OpsError> {
    let principal = Principal::Operator(DeviceId::new(name)?);
    if ops::identity::identity_cn(&home.operator_dir()).as_deref() == Some(&principal.cn()) {
        return Ok(home.operator_dir());
    }
    let dir = home.identity_dir(&principal);
    ops::identity::ensure_identity(
        home,
        &dir,
        &principal,
        edgebind_certs::profile::default_days::OPERATOR,
    )?;
    Ok(dir)
}

/// Queue `action` for `id` through `ops::send` (audited). Queued for the
/// fleet service, which delivers it at once to an online device and
/// records its result: the caller returns at once and the result appears
/// live under Commands (`crate::live`). It expires like an immediate
/// `edgebind send`: a device that does not take it within the console's
/// send timeout refuses it.
pub(crate) async fn send_action(
    console: &Shared,
    op: &Operator,
    id: DeviceId,
    action: Action,
    args: Map<String, Value>,
) -> Result<Vec<ops::send::QueuedCommand>, Failure> {
    let timeout = console.config.send_timeout;
    let operator = op.name.clone();
    let target = id.clone();
    let act = action.clone();
    let sent = with_store(console, move |home, store| {
        let req = SendRequest {
            targets: Targets::Device(target.clone()),
            action: act.clone(),
            args,
            mode: Mode::Queue,
            timeout,
            expires_in: Some(timeout.as_secs()),
            identity_dir: operator_identity(home, &operator)?,
            identity_explicit: true,
            broker: None,
            rate: None,
        };
        let sent = ops::send(home, store, &req, |_| {})?;
        let Sent::Queued(queued) = sent else {
            return Err(Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "a queued send did not queue",
            ));
        };
        let ids: Vec<&str> = queued.iter().map(|c| c.command.as_str()).collect();
        let detail = format!("{act}: queued as {}", ids.join(", "));
        audit(store, &operator, "send", target.as_str(), &detail);
        Ok(queued)
    })
    .await?;
    tracing::info!("console: operator:{} sent {action} to {id}", op.name);
    Ok(sent)
}

async fn send(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    Form(form): Form<SendForm>,
) -> Result<Response, Failure> {
    let err = |e: Failure| e.for_operator(&op);
    let id = DeviceId::new(&id).map_err(|e| err(e.into()))?;
    let action: Action = form
        .action
        .parse()
        .map_err(|e: String| err(Failure::new(StatusCode::BAD_REQUEST, e)))?;
    let args = parse_args(lines(&form.args)).map_err(|e| err(e.into()))?;
    let queued = send_action(&console, &op, id.clone(), action.clone(), args)
        .await
        .map_err(err)?;
    let message = queued
        .iter()
        .map(|c| {
            format!(
                "{action} queued as command {} for {}: the fleet service delivers it, \
                 its result appears under Commands",
                c.command, c.device
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    console.sessions.flash(&op, message);
    Ok(Redirect::to(&format!("/devices/{id}")).into_response())
}

#[derive(Deserialize)]
pub struct RevokeForm {
    /// The device id typed again: the confirmation.
    #[serde(default)]
    confirm: String,
}

/// Revoke `id` through `ops::revoke` (audited), if `confirm` is its id.
pub(crate) async fn revoke_device(
    console: &Shared,
    op: &Operator,
    id: DeviceId,
    confirm: &str,
) -> Result<ops::Revoked, Failure> {
    if confirm.trim() != id.as_str() {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            format!("not revoked: type the device id {id} to confirm"),
        ));
    }
    let target = id.clone();
    let operator = op.name.clone();
    let done = with_store(console, move |home, store| {
        let done = ops::revoke(home, store, &target, ops::Policy::Refresh)?;
        let detail = format!("{} certificate(s) on the CRL", done.certificates.len());
        audit(store, &operator, "revoke", target.as_str(), &detail);
        Ok(done)
    })
    .await?;
    tracing::info!("console: operator:{} revoked {id}", op.name);
    Ok(done)
}

/// What a revocation did, in words.
pub(crate) fn revoked_message(id: &DeviceId, done: &ops::Revoked) -> String {
    let mut message = format!(
        "revoked {id}: {} certificate(s) on the CRL, {} queued command(s) dropped",
        done.certificates.len(),
        done.dropped_commands
    );
    message.push_str(if broker_reloaded(done) {
        "; broker reloaded: its certificate is refused at every new handshake, and an open \
         connection is denied every topic until it drops"
    } else {
        "; broker not running here: the new ACL/CRL apply at its next start or `edgebind broker reload`"
    });
    message
}

pub(crate) fn broker_reloaded(done: &ops::Revoked) -> bool {
    done.policy.as_ref().is_some_and(|p| p.reloaded())
}

async fn revoke(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    Form(form): Form<RevokeForm>,
) -> Result<Response, Failure> {
    let err = |e: Failure| e.for_operator(&op);
    let id = DeviceId::new(&id).map_err(|e| err(e.into()))?;
    let done = revoke_device(&console, &op, id.clone(), &form.confirm)
        .await
        .map_err(err)?;
    console.sessions.flash(&op, revoked_message(&id, &done));
    Ok(Redirect::to(&format!("/devices/{id}")).into_response())
}

#[derive(Deserialize)]
pub struct SettingsForm {
    settings: String,
}

/// Change `id`'s desired settings through `ops::set` (audited; checked by
/// the typed settings contract there).
pub(crate) async fn set_settings(
    console: &Shared,
    op: &Operator,
    id: DeviceId,
    changes: Map<String, Value>,
) -> Result<ops::SettingsChanged, Failure> {
    let operator = op.name.clone();
    with_store(console, move |_, store| {
        let done = ops::set(store, &id, &changes)?;
        let detail = format!(
            "desired settings revision {} = {}",
            done.desired.revision,
            Value::Object(changes)
        );
        audit(store, &operator, "set", id.as_str(), &detail);
        Ok(done)
    })
    .await
}

async fn settings(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    Form(form): Form<SettingsForm>,
) -> Result<Response, Failure> {
    let err = |e: Failure| e.for_operator(&op);
    let id = DeviceId::new(&id).map_err(|e| err(e.into()))?;
    let changes = parse_settings(&form.settings).map_err(err)?;
    let done = set_settings(&console, &op, id.clone(), changes)
        .await
        .map_err(err)?;
    let mut message = format!(
        "desired settings revision {} = {} (the fleet service publishes it to the device)",
        done.desired.revision,
        Value::Object(done.desired.settings.clone())
    );
    for k in &done.unknown_keys {
        message.push_str(&format!(
            "\nnote: {k:?} is not a setting agents are known to understand; the device will report it as ignored"
        ));
    }
    console.sessions.flash(&op, message);
    Ok(Redirect::to(&format!("/devices/{id}")).into_response())
}

/// Stream the file at `path` as the download `name`; 404 naming `kind`
/// ("no identity bundle for this device") when there is none.
pub(crate) async fn download(
    path: std::path::PathBuf,
    name: String,
    kind: &str,
) -> Result<Response, Failure> {
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| Failure::new(StatusCode::NOT_FOUND, format!("no {kind}")))?;
    let len = file.metadata().await.map(|m| m.len()).ok();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let mut res = (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response();
    if let Some(len) = len {
        res.headers_mut().insert(
            header::CONTENT_LENGTH,
            len.to_string().parse().expect("a number"),
        );
    }
    Ok(res)
}

async fn bundle(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id = DeviceId::new(&id).map_err(|e| Failure::from(e).for_operator(&op))?;
    let tar = edgebind_certs::bundle::tar_path_for(&console.config.home.bundle_dir(&id));
    download(tar, format!("{id}.tar"), "identity bundle for this device")
        .await
        .map_err(|e| e.for_operator(&op))
}

async fn image(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id = DeviceId::new(&id).map_err(|e| Failure::from(e).for_operator(&op))?;
    download(
        image_path(&console.config.home, &id),
        format!("{id}.img"),
        "personalized image for this device",
    )
    .await
    .map_err(|e| e.for_operator(&op))
}

/// The golden images the console offers: the files in `--images DIR`.
pub(crate) fn golden_images(console: &Console) -> Vec<String> {
    let Some(dir) = &console.config.images else {
        return Vec::new();
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// The path of the golden image `name`, only if `--images` offers it (a
/// name is never a path: `../x` is refused).
pub(crate) fn golden_path(console: &Console, name: &str) -> Result<std::path::PathBuf, String> {
    match &console.config.images {
        Some(dir) if golden_images(console).iter().any(|n| n == name) => Ok(dir.join(name)),
        _ => Err(format!("no golden image {name:?} in --images")),
    }
}

async fn add_form(State(console): State<Shared>, Extension(op): Extension<Operator>) -> Response {
    pages::add_form(&op, &golden_images(&console), None).into_response()
}

#[derive(Deserialize)]
pub struct AddForm {
    board: String,
    #[serde(default)]
    tags: String,
    #[serde(default)]
    settings: String,
    ids: String,
    #[serde(default)]
    image: String,
}

/// What "add devices" asks for, checked before anything is registered.
pub(crate) struct AddRequest {
    board: Board,
    tags: BTreeSet<Tag>,
    settings: Map<String, Value>,
    ids: Vec<DeviceId>,
    golden: Option<std::path::PathBuf>,
}

fn check_add(console: &Console, form: &AddForm) -> Result<AddRequest, String> {
    let settings = parse_settings(&form.settings).map_err(|f| f.message)?;
    check_add_parts(
        console,
        &form.board,
        form.tags
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty()),
        settings,
        form.ids.split_whitespace(),
        non_empty(&form.image),
    )
}

/// Check everything "add devices" asks for before anything is registered.
pub(crate) fn check_add_parts<'a>(
    console: &Console,
    board: &str,
    tags: impl IntoIterator<Item = &'a str>,
    settings: Map<String, Value>,
    ids: impl IntoIterator<Item = &'a str>,
    image: Option<&str>,
) -> Result<AddRequest, String> {
    let board: Board = board.parse().map_err(|e: RegistryError| e.to_string())?;
    let tags = tags
        .into_iter()
        .map(|t| t.parse::<Tag>().map_err(|e| e.to_string()))
        .collect::<Result<BTreeSet<_>, _>>()?;
    ops::settings::check(&settings).map_err(|e| e.to_string())?;
    let mut checked = Vec::new();
    for word in ids {
        let id = DeviceId::new(word).map_err(|e| e.to_string())?;
        if checked.contains(&id) {
            return Err(format!("{id} is listed twice"));
        }
        checked.push(id);
    }
    if checked.is_empty() {
        return Err("name at least one device id".into());
    }
    let golden = image.map(|name| golden_path(console, name)).transpose()?;
    Ok(AddRequest {
        board,
        tags,
        settings,
        ids: checked,
        golden,
    })
}

/// Register each device of `req` (audited), one result per device.
pub(crate) async fn add_devices(
    console: &Shared,
    op: &Operator,
    req: AddRequest,
) -> Result<Vec<pages::AddedRow>, Failure> {
    let operator = op.name.clone();
    with_store(console, move |home, store| {
        Ok(req
            .ids
            .iter()
            .map(|id| {
                let row = add_one(home, store, &req, id);
                if let Ok(detail) = &row.result {
                    audit(store, &operator, "device.add", id.as_str(), detail);
                }
                row
            })
            .collect::<Vec<_>>())
    })
    .await
}

async fn add(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Form(form): Form<AddForm>,
) -> Result<Response, Failure> {
    let req = match check_add(&console, &form) {
        Ok(r) => r,
        Err(e) => {
            return Ok((
                StatusCode::BAD_REQUEST,
                pages::add_form(&op, &golden_images(&console), Some(&e)),
            )
                .into_response());
        }
    };
    let rows = add_devices(&console, &op, req)
        .await
        .map_err(|e| e.for_operator(&op))?;
    Ok(pages::added(&op, &rows).into_response())
}

/// Register one device (its bundle in `<home>/bundles/`), set its initial
/// settings, make its image: each step through `ops`.
fn add_one(
    home: &FleetHome,
    store: &mut dyn Store,
    req: &AddRequest,
    id: &DeviceId,
) -> pages::AddedRow {
    let registration = Registration {
        output: IdentityOutput::Bundle {
            dir: home.bundle_dir(id),
        },
        id: id.clone(),
        board: req.board.clone(),
        tags: req.tags.clone(),
        validity_days: edgebind_certs::profile::default_days::DEVICE,
        broker: None,
        unit: None,
    };
    let result = (|| -> Result<(String, bool), OpsError> {
        let done = ops::register_device(home, store, &registration)?;
        let mut msg = format!(
            "registered ({}), certificate serial {} valid until {}",
            done.device.board,
            done.serial,
            pages::unix_time(done.device.cert.as_ref().map(|c| c.not_after))
        );
        if !req.settings.is_empty() {
            let set = ops::set(store, id, &req.settings)?;
            msg.push_str(&format!(
                "; desired settings revision {}",
                set.desired.revision
            ));
        }
        let mut image = false;
        if let Some(golden) = &req.golden {
            let out = image_path(home, id);
            let dir = out.parent().expect("under console/images");
            std::fs::create_dir_all(dir).map_err(|source| OpsError::Io {
                path: dir.to_owned(),
                source,
            })?;
            let tar_path = edgebind_certs::bundle::tar_path_for(&home.bundle_dir(id));
            let tar = std::fs::read(&tar_path).map_err(|source| OpsError::Io {
                path: tar_path.clone(),
                source,
            })?;
            ops::write_image(golden, None, &out, &tar)?;
            msg.push_str("; personalized image made");
            image = true;
        }
        Ok((msg, image))
    })();
    match result {
        Ok((msg, image)) => pages::AddedRow {
            id: id.to_string(),
            result: Ok(msg),
            image,
        },
        Err(e) => pages::AddedRow {
            id: id.to_string(),
            result: Err(e.to_string()),
            image: false,
        },
    }
}

#[derive(Deserialize)]
pub struct AuditQuery {
    before: Option<i64>,
}

async fn audit_page(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Query(q): Query<AuditQuery>,
) -> Result<Response, Failure> {
    let entries = with_store(
        &console,
        move |_, store| Ok(store.audit_log(100, q.before)?),
    )
    .await
    .map_err(|e| e.for_operator(&op))?;
    Ok(pages::audit(&op, &entries).into_response())
}

/// Certificates expiring within this many days count as "expiring soon".
pub(crate) const EXPIRY_WARNING_DAYS: u64 = 30;

async fn overview(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
) -> Result<Response, Failure> {
    let soon = now_unix() + EXPIRY_WARNING_DAYS * 86_400;
    let (o, view) = with_store(&console, move |_, store| {
        Ok((store.overview(soon)?, presence(store)?))
    })
    .await
    .map_err(|e| e.for_operator(&op))?;
    Ok(pages::overview(&op, &o, view, EXPIRY_WARNING_DAYS).into_response())
}
