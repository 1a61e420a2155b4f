//! Long requests that report progress: with `stream: true` a request's work runs in a task
//! and the client gets SSE `progress` events, then one `result` (or `error`) event. When the
//! client goes away the progress channel closes, and the work, which checks it between engine
//! jobs, stops.

use super::AppState;
use crate::error::ApiError;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;

/// Where a request's work reports progress: nowhere, or the SSE stream of its client.
pub type Progress<P> = Option<mpsc::Sender<P>>;

/// Sends one progress report, and answers an error when the client has gone away (so the
/// work stops before its next engine job).
pub async fn report<P>(progress: &Progress<P>, p: P) -> Result<(), ApiError> {
    match progress {
        Some(tx) => tx.send(p).await.map_err(|_| cancelled()),
        None => Ok(()),
    }
}

/// Whether the streaming client has gone away.
pub fn gone<P>(progress: &Progress<P>) -> Result<(), ApiError> {
    match progress {
        Some(tx) if tx.is_closed() => Err(cancelled()),
        _ => Ok(()),
    }
}

fn cancelled() -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "cancelled", "the client went away")
}

/// Runs `work` in a task and streams its progress and result as SSE.
pub fn stream<P, R, F, Fut>(state: &AppState, work: F) -> Response
where
    P: Serialize + Send + 'static,
    R: Serialize + Send + 'static,
    F: FnOnce(Progress<P>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R, ApiError>> + Send + 'static,
{
    let (events, rx) = mpsc::channel::<Event>(16);
    let (ptx, mut prx) = mpsc::channel::<P>(16);
    tokio::spawn(async move {
        let forward = tokio::spawn({
            let events = events.clone();
            async move {
                while let Some(p) = prx.recv().await {
                    let ev = Event::default()
                        .event("progress")
                        .json_data(p)
                        .unwrap_or_default();
                    if events.send(ev).await.is_err() {
                        break;
                    }
                }
            }
        });
        let result = work(Some(ptx)).await;
        let _ = forward.await;
        let ev = match result {
            Ok(r) => Event::default()
                .event("result")
                .json_data(r)
                .unwrap_or_default(),
            Err(e) => Event::default().event("error").data(e.to_json()),
        };
        let _ = events.send(ev).await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    use futures_util::StreamExt;
    let keep_alive = Duration::from_secs(state.config.server.sse_keep_alive_secs.max(1));
    Sse::new(stream.map(Ok::<_, std::convert::Infallible>))
        .keep_alive(KeepAlive::new().interval(keep_alive))
        .into_response()
}
