//! Watch streams: newline-delimited JSON watch events over a chunked response.
//!
//! resourceVersion unset or "0": synthetic ADDED for the current state, then live events.
//! resourceVersion N: replay the history after N (410 Gone once N fell out of it), then live.
//! `sendInitialEvents=true`: like "0", closed by a BOOKMARK annotated `k8s.io/initial-events-end`.

use super::objects::selectors;
use super::query::Query;
use super::table::{self, RowObject};
use super::{Shared, Target};
use crate::errors::ApiError;
use crate::resources::Resource;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{EventType, WatchEvent, meta};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

/// Real servers send a bookmark about once a minute; clients only need "now and then".
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

struct Filter {
    res: &'static Resource,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    table: Option<RowObject>,
    query: Query,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event type this watcher sees for `ev`, if any: a change that makes an object start
    /// (stop) matching the selectors is ADDED (DELETED) for this watcher.
    fn kind_for(&self, ev: &WatchEvent) -> Option<&'static str> {
        if ev.resource != self.res.plural
            || self.namespace.as_deref().is_some_and(|ns| meta::namespace(&ev.object) != ns)
        {
            return None;
        }
        let now = self.matches(&ev.object);
        match (ev.kind, ev.previous.as_ref().map(|p| self.matches(p))) {
            (EventType::Modified, Some(true)) if !now => Some(EventType::Deleted.as_str()),
            (EventType::Modified, Some(false)) if now => Some(EventType::Added.as_str()),
            (EventType::Modified, Some(false)) => None,
            (kind, _) => now.then_some(kind.as_str()),
        }
    }

    fn line(&self, kind: &str, obj: &Value) -> Bytes {
        let object = match self.table {
            Some(mode) => table::render(
                self.res,
                std::slice::from_ref(obj),
                meta::resource_version(obj).parse().ok(),
                mode,
                &self.query,
            ),
            None => crate::store::views::to_view(self.res, obj.clone()),
        };
        let mut line = json!({"type": kind, "object": object}).to_string();
        line.push('\n');
        Bytes::from(line)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut md = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let mut line =
            json!({"type": "BOOKMARK", "object": {"kind": self.res.kind, "apiVersion": self.res.group_version, "metadata": md}})
                .to_string();
        line.push('\n');
        Bytes::from(line)
    }
}

pub fn serve(state: &Shared, t: &Target, query: &Query, headers: &HeaderMap) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(query)?;
    let filter = Filter {
        res: t.res,
        namespace: t.namespace.clone(),
        labels,
        fields,
        table: table::requested(headers),
        query: query.clone(),
    };
    let bookmarks = query.flag("allowWatchBookmarks")?;
    let send_initial = query.flag("sendInitialEvents")?;
    let timeout = query.int("timeoutSeconds")?.filter(|s| *s > 0).map(|s| Duration::from_secs(s as u64));
    let rv_param = query.get("resourceVersion").filter(|v| !v.is_empty());

    let mut initial: Vec<Bytes> = Vec::new();
    let (mut last_rv, mut rx) = match rv_param {
        Some(rv) if rv != "0" && !send_initial => {
            let rv: u64 = rv
                .parse()
                .map_err(|_| ApiError::BadRequest(format!("invalid resourceVersion {rv:?}: must be an integer")))?;
            let (history, rx) = match state.store.replay_and_subscribe(rv) {
                Ok(found) => found,
                // Like the real server: 200 with an ERROR event carrying the 410 Status, which is
                // what makes kube-rs' watcher and client-go's reflector re-list.
                Err(gone @ ApiError::Gone { .. }) => return Ok(single_error_event(&gone)),
                Err(other) => return Err(other),
            };
            initial.extend(history.iter().filter_map(|e| filter.kind_for(e).map(|k| filter.line(k, &e.object))));
            (history.last().map_or(rv, |e| e.rv), rx)
        }
        _ => {
            let (items, rv, rx) = state.store.list_and_subscribe(t.res, t.namespace.as_deref());
            for obj in items.iter().filter(|o| filter.matches(o)) {
                initial.push(filter.line(EventType::Added.as_str(), obj));
            }
            if send_initial {
                initial.push(filter.bookmark(rv, true));
            }
            (rv, rx)
        }
    };

    let (tx, mut out) = mpsc::channel::<Bytes>(256);
    let cancel = state.cancel.clone();
    tokio::spawn(async move {
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let line = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => return,
                _ = ticker.tick(), if bookmarks => filter.bookmark(last_rv, false),
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        let ev: Arc<WatchEvent> = ev;
                        if ev.rv <= last_rv {
                            continue;
                        }
                        last_rv = ev.rv;
                        match filter.kind_for(&ev) {
                            Some(kind) => filter.line(kind, &ev.object),
                            None => continue,
                        }
                    }
                    // Too slow to keep up: end the watch; clients re-watch from their last version.
                    Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return,
                },
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::poll_fn(move |cx| out.poll_recv(cx).map(|o| o.map(Ok::<_, Infallible>)));
    let mut resp = (StatusCode::OK, Body::from_stream(stream)).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    Ok(resp)
}

fn single_error_event(err: &ApiError) -> Response {
    let mut line = json!({"type": "ERROR", "object": err.to_status()}).to_string();
    line.push('\n');
    let mut resp = (StatusCode::OK, line).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
