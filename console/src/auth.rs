//! Sessions, the login-code exchange, CSRF and the failed-login limit
//! (the scheme and why: the crate doc).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use serde::Deserialize;

use crate::Console;
use crate::pages;

/// The session cookie. `__Host-`: the browser keeps it only when it is
/// `Secure`, for `/`, and for this host alone.
pub const SESSION_COOKIE: &str = "__Host-edgebind_session";
/// The form field (or `x-csrf-token` header) every state change carries.
pub const CSRF_FIELD: &str = "csrf";
/// Failed logins admitted per [`FAILED_LOGIN_WINDOW`] before the console
/// answers 429 to every login attempt until the window has passed.
pub const MAX_FAILED_LOGINS: usize = 10;
pub const FAILED_LOGIN_WINDOW: Duration = Duration::from_secs(60);

struct Session {
    operator: String,
    /// How the session's token is presented: an `Authorization: Bearer`
    /// header (a script's, from `POST /api/session`) or the cookie (a
    /// browser's). Each works only the way it was issued, so a bearer
    /// session never rides on a cookie a browser sends by itself.
    bearer: bool,
    csrf: String,
    expires: Instant,
    flash: Option<String>,
}

/// The logged-in operator of a request (put there by [`require_session`]).
#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
    pub csrf: String,
    /// A message from the previous request (after a redirect), shown once.
    pub flash: Option<String>,
    token: String,
}

#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<VecDeque<Instant>>,
}

fn random_token() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Equal without an early exit, so a timing does not reveal a prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sessions {
    fn create(&self, operator: String, ttl: Duration, bearer: bool) -> String {
        let token = random_token();
        let mut sessions = self.sessions.lock().unwrap();
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            token.clone(),
            Session {
                operator,
                bearer,
                csrf: random_token(),
                expires: now + ttl,
                flash: None,
            },
        );
        token
    }

    fn get(&self, token: &str, bearer: bool) -> Option<Operator> {
        let mut sessions = self.sessions.lock().unwrap();
        let s = sessions.get_mut(token)?;
        if s.expires <= Instant::now() {
            sessions.remove(token);
            return None;
        }
        if s.bearer != bearer {
            return None;
        }
        Some(Operator {
            name: s.operator.clone(),
            csrf: s.csrf.clone(),
            flash: s.flash.take(),
            token: token.to_owned(),
        })
    }

    /// Whether `operator`'s session is still valid (without taking its flash).
    pub fn alive(&self, operator: &Operator) -> bool {
        self.sessions
            .lock()
            .unwrap()
            .get(&operator.token)
            .is_some_and(|s| s.expires > Instant::now())
    }

    /// Keep `message` for the next page this session sees.
    pub fn flash(&self, operator: &Operator, message: String) {
        if let Some(s) = self.sessions.lock().unwrap().get_mut(&operator.token) {
            s.flash = Some(message);
        }
    }

    fn remove(&self, token: &str) {
        self.sessions.lock().unwrap().remove(token);
    }

    /// Whether login attempts are refused now (too many failures lately).
    fn limited(&self) -> bool {
        let mut f = self.failures.lock().unwrap();
        let now = Instant::now();
        while f
            .front()
            .is_some_and(|t| now.duration_since(*t) > FAILED_LOGIN_WINDOW)
        {
            f.pop_front();
        }
        f.len() >= MAX_FAILED_LOGINS
    }

    fn failed(&self) {
        self.failures.lock().unwrap().push_back(Instant::now());
    }

    #[cfg(test)]
    pub fn expire_all(&self) {
        for s in self.sessions.lock().unwrap().values_mut() {
            s.expires = Instant::now();
        }
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn wants_html(req: &Request) -> bool {
    req.method() == Method::GET
        && req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"))
}

/// Every route but the login page and the assets: a valid session, and on
/// anything but GET/HEAD the session's CSRF token.
pub async fn require_session(
    State(console): State<Arc<Console>>,
    req: Request,
    next: Next,
) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let operator = match &bearer {
        Some(token) => console.sessions.get(token, true),
        None => cookie(req.headers(), SESSION_COOKIE).and_then(|t| console.sessions.get(t, false)),
    };
    let Some(operator) = operator else {
        if wants_html(&req) {
            return Redirect::to("/login").into_response();
        }
        return (
            StatusCode::UNAUTHORIZED,
            "log in first: edgebind console login\n",
        )
            .into_response();
    };
    let mut req = req;
    // A bearer token is never sent by a browser on its own: no CSRF to fear.
    if bearer.is_none() && !matches!(*req.method(), Method::GET | Method::HEAD) {
        let by_header = req
            .headers()
            .get("x-csrf-token")
            .is_some_and(|v| same(v.as_bytes(), operator.csrf.as_bytes()));
        if !by_header {
            let (parts, body) = req.into_parts();
            let Ok(bytes) = axum::body::to_bytes(body, 4 << 20).await else {
                return (StatusCode::PAYLOAD_TOO_LARGE, "request too large\n").into_response();
            };
            let by_form = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
                .ok()
                .and_then(|fields| fields.into_iter().find(|(k, _)| k == CSRF_FIELD))
                .is_some_and(|(_, v)| same(v.as_bytes(), operator.csrf.as_bytes()));
            if !by_form {
                return (
                    StatusCode::FORBIDDEN,
                    "refused: missing or wrong CSRF token (reload the page)\n",
                )
                    .into_response();
            }
            req = Request::from_parts(parts, axum::body::Body::from(bytes));
        }
    }
    req.extensions_mut().insert(operator);
    next.run(req).await
}

#[derive(Deserialize)]
pub struct LoginQuery {
    code: Option<String>,
}

pub async fn login_page(Query(q): Query<LoginQuery>) -> Response {
    pages::login(q.code.as_deref().unwrap_or(""), None).into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    code: String,
}

/// Why a login code was not exchanged.
pub enum Refused {
    Limited,
    Code,
    Internal(String),
}

/// Exchange a login code for a new session (rate-limited, audited): the
/// operator's name and the session token.
pub async fn redeem(
    console: &Arc<Console>,
    code: String,
    bearer: bool,
) -> Result<(String, String), Refused> {
    if console.sessions.limited() {
        return Err(Refused::Limited);
    }
    let c = console.clone();
    let redeemed = tokio::task::spawn_blocking(move || {
        let mut store = c.store.lock().unwrap();
        edgebind_fleet::ops::redeem_login_code(&c.config.home, store.as_mut(), &code)
    })
    .await;
    match redeemed {
        Ok(Ok(operator)) => {
            let ttl = console.config.session_ttl;
            let token = console.sessions.create(operator.to_string(), ttl, bearer);
            tracing::info!("console: operator:{operator} logged in");
            let kind = if bearer { "API session" } else { "session" };
            crate::handlers::audit_later(
                console,
                operator.as_str(),
                "console.login",
                "",
                format!("{kind} for {} min", ttl.as_secs() / 60),
            )
            .await;
            Ok((operator.to_string(), token))
        }
        Ok(Err(e)) => {
            console.sessions.failed();
            tracing::warn!("console: login refused: {e}");
            Err(Refused::Code)
        }
        Err(e) => Err(Refused::Internal(e.to_string())),
    }
}

pub async fn login(State(console): State<Arc<Console>>, Form(form): Form<LoginForm>) -> Response {
    match redeem(&console, form.code, false).await {
        Ok((_, token)) => (
            [(
                header::SET_COOKIE,
                format!(
                    "{SESSION_COOKIE}={token}; Path=/; Max-Age={}; Secure; HttpOnly; SameSite=Strict",
                    console.config.session_ttl.as_secs()
                ),
            )],
            Redirect::to("/devices"),
        )
            .into_response(),
        Err(Refused::Limited) => (
            StatusCode::TOO_MANY_REQUESTS,
            pages::login("", Some("too many failed logins: wait a minute")),
        )
            .into_response(),
        Err(Refused::Code) => (
            StatusCode::FORBIDDEN,
            pages::login(
                "",
                Some("login code refused: unknown, already used or expired"),
            ),
        )
            .into_response(),
        Err(Refused::Internal(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// End `operator`'s session (audited).
pub async fn end_session(console: &Arc<Console>, operator: &Operator) {
    console.sessions.remove(&operator.token);
    crate::handlers::audit_later(console, &operator.name, "console.logout", "", String::new())
        .await;
}

pub async fn logout(
    State(console): State<Arc<Console>>,
    Extension(operator): Extension<Operator>,
) -> Response {
    end_session(&console, &operator).await;
    (
        [(
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict"),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}
