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
use axum::{Extension, Form, Json};
use edgebind_fleet::ops::{
    self, FleetHome, IdentityOutput, Mode, OpsError, Registration, SendRequest, Sent, Targets,
};
use edgebind_fleet::registry::rules::PresenceView;
use edgebind_fleet::registry::{
    Board, DeviceQuery, PresenceState, RegistryError, Store, Tag, parse_args, parse_setting, rules,
};
use edgebind_protocol::messages::{Action, Inventory, now_unix};
use edgebind_protocol::{DeviceId, Principal, actions};
use serde::Deserialize;
use serde_json::{Map, Value, json};

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
        .route("/devices/{id}/send", post(send))
        .route("/devices/{id}/settings", post(settings))
        .route("/devices/{id}/revoke", post(revoke))
        .route("/devices/{id}/bundle.tar", get(bundle))
        .route("/devices/{id}/image", get(image))
        .route("/add", get(add_form).post(add))
        .route("/api/devices", get(api_devices))
        .route("/audit", get(audit_page))
        .route("/logout", post(auth::logout))
        .layer(middleware::from_fn_with_state(
            console.clone(),
            auth::require_session,
        ));
    Router::new()
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/assets/console.css", get(assets::css))
        .route("/assets/console.js", get(assets::js))
        .merge(private)
        .layer(middleware::map_response(security_headers))
        .with_state(console)
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
    status: StatusCode,
    message: String,
    operator: Option<Box<Operator>>,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
            operator: None,
        }
    }

    fn for_operator(mut self, op: &Operator) -> Self {
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
async fn with_store<T: Send + 'static>(
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
fn audit(store: &mut dyn Store, operator: &str, action: &str, target: &str, detail: &str) {
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

fn presence(store: &dyn Store) -> Result<PresenceView, Failure> {
    Ok(rules::presence_view(&store.services()?, now_unix()))
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    tag: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    q: String,
    #[serde(default)]
    after: String,
    limit: Option<u32>,
}

impl ListQuery {
    fn to_query(&self) -> Result<DeviceQuery, Failure> {
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

fn non_empty(s: &str) -> Option<&str> {
    Some(s.trim()).filter(|s| !s.is_empty())
}

async fn list(
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

async fn api_devices(
    State(console): State<Shared>,
    Query(q): Query<ListQuery>,
) -> Result<Response, Failure> {
    let (page, view) = list(&console, &q).await?;
    let rows: Vec<Value> = page
        .devices
        .iter()
        .map(|d| {
            json!({
                "id": d.id, "board": d.board, "tags": d.tags, "lifecycle": d.lifecycle,
                "state": d.presence_state(), "online": d.online, "presence_stale": !view.fresh,
                "last_seen": d.last_seen, "agent_version": d.agent_version,
                "cert_not_after": d.cert.as_ref().map(|c| c.not_after),
                "desired_revision": d.desired_revision, "converged": d.converged(),
            })
        })
        .collect();
    Ok(Json(json!({"devices": rows, "next_after": page.next_after})).into_response())
}

/// Where the console keeps the personalized image of a device.
fn image_path(home: &FleetHome, id: &DeviceId) -> std::path::PathBuf {
    home.root()
        .join("console")
        .join("images")
        .join(format!("{id}.img"))
}

fn offered_actions(inventory: Option<&Value>) -> Vec<String> {
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
    let (device, view, telemetry, commands) = with_store(&console, {
        let id = id.clone();
        move |_, store| {
            Ok((
                store.device(&id)?,
                presence(store)?,
                store.telemetry_history(&id, 20)?,
                store.commands_for(&id, 20)?,
            ))
        }
    })
    .await
    .map_err(err)?;
    let image = image_path(&console.config.home, &id)
        .metadata()
        .ok()
        .map(|m| format!("{} MiB", m.len() >> 20));
    let v = pages::DeviceView {
        actions: offered_actions(device.inventory.as_ref()),
        device: &device,
        view,
        telemetry: &telemetry,
        commands: &commands,
        image,
    };
    Ok(pages::device(&op, &v).into_response())
}

async fn device_live(
    State(console): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id = DeviceId::new(&id)?;
    let (device, view) = with_store(&console, move |_, store| {
        Ok((store.device(&id)?, presence(store)?))
    })
    .await?;
    Ok(pages::device_live(&device, view).into_response())
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
    let home = console.config.home.clone();
    let timeout = console.config.send_timeout;
    let operator = op.name.clone();
    let target = id.clone();
    let act = action.clone();
    let sent = tokio::task::spawn_blocking(move || -> Result<Sent, OpsError> {
        let identity_dir = operator_identity(&home, &operator)?;
        // Its own registry connection: a send waits for the device.
        let mut store = home.open_registry()?;
        let req = SendRequest {
            targets: Targets::Device(target),
            action: act,
            args,
            mode: Mode::Now,
            timeout,
            expires_in: None,
            identity_dir,
            identity_explicit: true,
            broker: None,
            rate: None,
        };
        ops::send(&home, store.as_mut(), &req, |_| {})
    })
    .await
    .map_err(|e| {
        err(Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        ))
    })?
    .map_err(|e| err(e.into()))?;
    let message = match &sent {
        Sent::Finished {
            outcomes,
            not_recorded,
        } => {
            let mut m: Vec<String> = outcomes
                .iter()
                .map(|o| pages::outcome_line(o, action.as_str()))
                .collect();
            if let Some(e) = not_recorded {
                m.push(format!("results not recorded in the registry: {e}"));
            }
            m.join("\n")
        }
        Sent::Queued(q) => format!("{} command(s) queued", q.len()),
        Sent::Rules(r) => format!("{} on-connect rule(s) added", r.len()),
    };
    audit_later(
        &console,
        &op.name,
        "send",
        id.as_str(),
        format!("{action}: {message}"),
    )
    .await;
    console.sessions.flash(&op, message);
    Ok(Redirect::to(&format!("/devices/{id}")).into_response())
}

#[derive(Deserialize)]
pub struct RevokeForm {
    /// The device id typed again: the confirmation.
    #[serde(default)]
    confirm: String,
}

async fn revoke(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    Form(form): Form<RevokeForm>,
) -> Result<Response, Failure> {
    let err = |e: Failure| e.for_operator(&op);
    let id = DeviceId::new(&id).map_err(|e| err(e.into()))?;
    if form.confirm.trim() != id.as_str() {
        return Err(err(Failure::new(
            StatusCode::BAD_REQUEST,
            format!("not revoked: type the device id {id} to confirm"),
        )));
    }
    let target = id.clone();
    let operator = op.name.clone();
    let done = with_store(&console, move |home, store| {
        let done = ops::revoke(home, store, &target, ops::Policy::Refresh)?;
        let detail = format!("{} certificate(s) on the CRL", done.certificates.len());
        audit(store, &operator, "revoke", target.as_str(), &detail);
        Ok(done)
    })
    .await
    .map_err(err)?;
    let reloaded = done.policy.as_ref().is_some_and(|p| p.reloaded());
    let mut message = format!(
        "revoked {id}: {} certificate(s) on the CRL, {} queued command(s) dropped",
        done.certificates.len(),
        done.dropped_commands
    );
    message.push_str(if reloaded {
        "; broker reloaded: its certificate is refused at every new handshake, and an open \
         connection is denied every topic until it drops"
    } else {
        "; broker not running here: the new ACL/CRL apply at its next start or `edgebind broker reload`"
    });
    tracing::info!("console: operator:{} revoked {id}", op.name);
    console.sessions.flash(&op, message);
    Ok(Redirect::to(&format!("/devices/{id}")).into_response())
}

#[derive(Deserialize)]
pub struct SettingsForm {
    settings: String,
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
    let target = id.clone();
    let operator = op.name.clone();
    let done = with_store(&console, move |_, store| {
        let done = ops::set(store, &target, &changes)?;
        let detail = format!(
            "desired settings revision {} = {}",
            done.desired.revision,
            Value::Object(changes)
        );
        audit(store, &operator, "set", target.as_str(), &detail);
        Ok(done)
    })
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

async fn download(path: std::path::PathBuf, name: String, kind: &str) -> Result<Response, Failure> {
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| Failure::new(StatusCode::NOT_FOUND, format!("no {kind} for this device")))?;
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
    download(tar, format!("{id}.tar"), "identity bundle")
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
        "personalized image",
    )
    .await
    .map_err(|e| e.for_operator(&op))
}

/// The golden images the console offers: the files in `--images DIR`.
fn golden_images(console: &Console) -> Vec<String> {
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
struct AddRequest {
    board: Board,
    tags: BTreeSet<Tag>,
    settings: Map<String, Value>,
    ids: Vec<DeviceId>,
    golden: Option<std::path::PathBuf>,
}

fn check_add(console: &Console, form: &AddForm) -> Result<AddRequest, String> {
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
    let settings = parse_settings(&form.settings).map_err(|f| f.message)?;
    ops::settings::check(&settings).map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    for word in form.ids.split_whitespace() {
        let id = DeviceId::new(word).map_err(|e| e.to_string())?;
        if ids.contains(&id) {
            return Err(format!("{id} is listed twice"));
        }
        ids.push(id);
    }
    if ids.is_empty() {
        return Err("name at least one device id".into());
    }
    let golden = match non_empty(&form.image) {
        None => None,
        Some(name) => {
            if !golden_images(console).iter().any(|n| n == name) {
                return Err(format!("no golden image {name:?} in --images"));
            }
            console.config.images.as_ref().map(|d| d.join(name))
        }
    };
    Ok(AddRequest {
        board,
        tags,
        settings,
        ids,
        golden,
    })
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
    let operator = op.name.clone();
    let rows = with_store(&console, move |home, store| {
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
const EXPIRY_WARNING_DAYS: u64 = 30;

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
