//! `GET /v1/flows?pod=NS/POD&verdict=denied&rate=N`: the flow stream, chunked NDJSON (one
//! [`Flow`](super::Flow) per line) for as long as the client reads. The response's headers are
//! sent once the client's flows are on (its verdicts in the programs' settings, the peers
//! named), so a client that has them sees every flow decided after. An empty line is sent after
//! [`KEEPALIVE`] without flows (so a client that went away is noticed and let go).
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame};
use tokio::sync::{mpsc, Notify};

use super::hub::{Filter, FlowHub, Subscription};

pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// How long a new client waits for the daemon loop to build the pod directory (it names the
/// peers) before its stream begins anyway.
pub const DIRECTORY_WAIT: Duration = Duration::from_secs(2);
/// Lines sent in one chunk at most.
const BATCH: usize = 64;

/// The response body: the client's queue, then keep-alives.
pub struct FlowBody {
    rx: mpsc::Receiver<Bytes>,
    keepalive: Pin<Box<tokio::time::Sleep>>,
    _sub: Subscription,
}

impl Body for FlowBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(first)) => {
                let mut chunk = BytesMut::from(&first[..]);
                for _ in 1..BATCH {
                    match this.rx.try_recv() {
                        Ok(line) => chunk.extend_from_slice(&line),
                        Err(_) => break,
                    }
                }
                this.keepalive.as_mut().reset(tokio::time::Instant::now() + KEEPALIVE);
                Poll::Ready(Some(Ok(Frame::data(chunk.freeze()))))
            }
            // The hub let the client go.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.keepalive.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.keepalive.as_mut().reset(tokio::time::Instant::now() + KEEPALIVE);
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"\n")))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// Why a stream was refused: the status code and message.
pub type Refusal = (u16, String);

/// Opens a stream for the query `query`: the filter read, the programs' settings widened, the
/// directory waited for. `cancel` ends the connection if the client stalls.
pub async fn open(hub: &Arc<FlowHub>, query: &str, cancel: Arc<Notify>) -> Result<FlowBody, Refusal> {
    let filter = Filter::from_query(query).map_err(|e| (400, format!("{e}\n")))?;
    let watching = hub.watch();
    let t0 = tokio::time::Instant::now();
    while !hub.directory_ready() && t0.elapsed() < DIRECTORY_WAIT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (rx, sub) =
        hub.subscribe(filter, cancel).ok_or_else(|| (503, format!("{} flow clients already connected\n", super::hub::MAX_CLIENTS)))?;
    drop(watching);
    Ok(FlowBody { rx, keepalive: Box::pin(tokio::time::sleep(KEEPALIVE)), _sub: sub })
}
