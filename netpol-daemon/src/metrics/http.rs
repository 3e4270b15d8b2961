//! The endpoint's HTTP server: hyper on a small tokio runtime of its own (one thread, the
//! `metrics` thread), so any number of clients are served at once and none can hold up the
//! others: a client gets [`HEADER_READ_TIMEOUT`] to send its request headers and
//! [`CONNECTION_TIMEOUT`] for the whole exchange, and at most [`MAX_CONNECTIONS`] are open at
//! a time (those over it are closed at once). One request per connection (no keep-alive), so
//! an idle client holds nothing. A scrape reads the BPF maps on tokio's blocking pool, so a
//! large one never delays `/healthz` or `/readyz`. The flow stream (`GET /v1/flows`,
//! [`super::flows::stream`]) is the one exchange that outlives [`CONNECTION_TIMEOUT`]: it lasts
//! while its client reads (at most [`super::flows::hub::MAX_CLIENTS`] at once).
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, Semaphore};

use super::Scraper;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What a connection's service tells the code driving it.
#[derive(Default)]
struct Conn {
    /// It answers with the flow stream: no overall timeout.
    streaming: AtomicBool,
    /// Notified to end the connection (its flow client stalled).
    cancel: Arc<Notify>,
}

pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_CONNECTIONS: usize = 512;

/// Serves on `listener` (already bound) from a thread of its own until the process exits.
pub fn spawn(listener: std::net::TcpListener, scraper: Arc<Scraper>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().max_blocking_threads(2).build()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || rt.block_on(accept(listener, scraper)))?;
    Ok(())
}

async fn accept(listener: std::net::TcpListener, scraper: Arc<Scraper>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics endpoint: {e}: not serving");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, most likely: let some connections end first.
                tracing::warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit: the connection is closed at once (dropped).
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let scraper = scraper.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let c = Arc::new(Conn::default());
            let c2 = c.clone();
            let service = service_fn(move |req| respond(req, scraper.clone(), c2.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            // A client too slow to send its request, or to read the answer, is dropped; a
            // flow stream lasts until its client leaves or stalls.
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = c.cancel.notified() => return,
                _ = tokio::time::sleep(CONNECTION_TIMEOUT) => {}
            }
            if c.streaming.load(Ordering::SeqCst) {
                tokio::select! {
                    _ = conn => {}
                    _ = c.cancel.notified() => {}
                }
            }
        });
    }
}

async fn respond(req: Request<Incoming>, scraper: Arc<Scraper>, conn: Arc<Conn>) -> Result<Response<Body>, Infallible> {
    let (code, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/flows") => {
            let hub = &scraper.shared.flows;
            match super::flows::stream::open(hub, req.uri().query().unwrap_or(""), conn.cancel.clone()).await {
                Ok(body) => {
                    conn.streaming.store(true, Ordering::SeqCst);
                    return Ok(flow_response(body, hub));
                }
                Err((code, msg)) => (code, "text/plain", msg),
            }
        }
        (&Method::GET, "/metrics") => match tokio::task::spawn_blocking(move || scraper.scrape()).await {
            Ok(text) => (200, prometheus::TEXT_FORMAT, text),
            Err(e) => (500, "text/plain", format!("rendering the metrics failed: {e}\n")),
        },
        (&Method::GET, "/readyz") => {
            let (code, body) = scraper.shared.readiness();
            (code, "text/plain", body.to_string())
        }
        (&Method::GET, "/healthz") => {
            let (code, body) = scraper.shared.liveness();
            (code, "text/plain", body)
        }
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    Ok(resp)
}

/// The flow stream's response: NDJSON, this node's name and the programs' settings now.
fn flow_response(body: super::flows::stream::FlowBody, hub: &super::flows::FlowHub) -> Response<Body> {
    let mut resp = Response::new(body.boxed_unsync());
    let h = resp.headers_mut();
    h.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/x-ndjson"));
    let s = hub.settings();
    for (name, value) in [("x-netpol-node", hub.node().to_string()), ("x-netpol-event-rate", s.per_sec.to_string())] {
        if let Ok(v) = hyper::header::HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    resp
}
