//! Live regions over server-sent events. A page's element with
//! `data-live="URL"` opens an `EventSource` on URL; the console re-renders
//! the page's live regions (elements by id) from the registry and sends
//! them as one `update` event (`{"regions": {id: html}}`) whenever they
//! differ from what it sent last, so presence, command results and
//! settings convergence change in place without a reload.
//!
//! Why the console watches the registry rather than the broker: the
//! registry is what every page shows (written by the fleet service, on
//! SQLite or PostgreSQL), so a region can never show a state the page
//! would not; the console holds no copy of the fleet and needs no broker
//! connection of its own. The re-render is one small read (the region's
//! rows); its interval adapts to what it costs: [`MIN_INTERVAL`], or ten
//! times the last render's duration if that is longer, so a slow query
//! (a search over a large fleet) cannot load the registry by more than a
//! tenth of one connection per open page.
//!
//! Every tick also checks the session: when it has expired or logged out,
//! the stream sends `expired` and ends (the page then reloads into the
//! login page).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use axum::response::Response;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use serde_json::json;

use crate::Console;
use crate::auth::Operator;

/// The shortest interval between two renders of one region.
pub const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// The interval after a render that took `took`.
pub fn next_interval(took: Duration) -> Duration {
    MIN_INTERVAL.max(took * 10)
}

struct Watch<F> {
    render: F,
    last: Option<String>,
    interval: Duration,
    first: bool,
    done: bool,
}

/// The regions of one update: element id and its new HTML.
pub type Regions = Vec<(&'static str, String)>;

/// An SSE response that sends `render()`'s regions whenever they change, while
/// `op`'s session lasts. A render that fails (the registry busy, say) is
/// skipped: the region keeps what it shows until the next one succeeds.
pub fn region<F, Fut, E>(console: Arc<Console>, op: Operator, render: F) -> Response
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Regions, E>> + Send,
    E: std::fmt::Display,
{
    let watch = Watch {
        render,
        last: None,
        interval: MIN_INTERVAL,
        first: true,
        done: false,
    };
    let events = stream::unfold(watch, move |mut w| {
        let console = console.clone();
        let op = op.clone();
        async move { next_event(&console, &op, &mut w).await.map(|e| (e, w)) }
    });
    sse(events).into_response()
}

fn sse(
    events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + Send + 'static> {
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

async fn next_event<F, Fut, E>(
    console: &Console,
    op: &Operator,
    w: &mut Watch<F>,
) -> Option<Result<Event, Infallible>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Regions, E>>,
    E: std::fmt::Display,
{
    loop {
        if w.done {
            return None;
        }
        if !w.first {
            tokio::time::sleep(w.interval).await;
        }
        w.first = false;
        if !console.sessions.alive(op) {
            w.done = true;
            return Some(Ok(Event::default().event("expired").data("log in again")));
        }
        let started = Instant::now();
        let rendered = (w.render)().await;
        w.interval = next_interval(started.elapsed());
        match rendered {
            Ok(regions) => {
                let regions: serde_json::Map<String, serde_json::Value> = regions
                    .into_iter()
                    .map(|(id, html)| (id.to_owned(), html.into()))
                    .collect();
                let data = json!({ "regions": regions }).to_string();
                if w.last.as_deref() != Some(data.as_str()) {
                    let event = Event::default().event("update").data(&data);
                    w.last = Some(data);
                    return Some(Ok(event));
                }
            }
            Err(e) => tracing::warn!("console: live region not refreshed: {e}"),
        }
    }
}
