//! `observe`: the node's live flow stream, like `hubble observe`. Connects to the daemon's
//! endpoint (`GET /v1/flows`, chunked NDJSON over HTTP/1.1 on a plain socket) and writes each
//! flow as a line of text or as the JSON object it arrived as, until the stream ends or the
//! output is closed.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::Output;
use crate::metrics::flows::{render, Filter, Flow};

/// With keep-alives every second, this long without a byte means the daemon is gone.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How the stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The daemon closed it (it stopped).
    ByDaemon,
    /// Whoever reads our output stopped reading.
    OutputClosed,
}

/// Streams the flows `filter` selects from the daemon at `addr` (HOST:PORT) into `out`.
/// `connected` is called with the response's description once the stream is on (every flow
/// decided from then on is in it).
pub fn observe(addr: &str, filter: &Filter, output: Output, out: &mut dyn Write, connected: impl FnOnce(&str)) -> Result<Ended> {
    let sa =
        addr.to_socket_addrs().with_context(|| format!("--addr {addr}"))?.next().ok_or_else(|| anyhow!("--addr {addr}: no address"))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(5)).with_context(|| format!("connecting to the daemon at {addr}"))?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    write!(s, "GET /v1/flows?{} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/x-ndjson\r\n\r\n", filter.to_query())?;
    let mut r = BufReader::new(s);
    let head = read_head(&mut r)?;
    let status: u16 = head.first().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let header = |name: &str| {
        head.iter().skip(1).find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()))
    };
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let mut body: Box<dyn BufRead> = if chunked { Box::new(BufReader::new(Chunked::new(r))) } else { Box::new(r) };
    if status != 200 {
        let mut msg = String::new();
        let _ = body.read_to_string(&mut msg);
        bail!("the daemon at {addr} answered {status}: {}", msg.trim());
    }
    let node = header("x-netpol-node").unwrap_or_default();
    let rate = header("x-netpol-event-rate").unwrap_or_default();
    connected(&format!("observing node {node} at {addr} (at most {rate} events per second and CPU)"));
    let mut line = String::new();
    loop {
        line.clear();
        if body.read_line(&mut line).context("reading the flow stream")? == 0 {
            return Ok(Ended::ByDaemon);
        }
        let text = line.trim_end();
        // Keep-alives.
        if text.is_empty() {
            continue;
        }
        let written = match output {
            Output::Json => writeln!(out, "{text}"),
            Output::Text => {
                let flow: Flow = serde_json::from_str(text).with_context(|| format!("a flow the daemon sent: {text}"))?;
                writeln!(out, "{}", render::text_line(&flow))
            }
        };
        if written.and_then(|()| out.flush()).is_err() {
            return Ok(Ended::OutputClosed);
        }
    }
}

/// The status line and headers, up to the blank line.
fn read_head(r: &mut impl BufRead) -> Result<Vec<String>> {
    let mut head = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            bail!("the daemon closed the connection before answering");
        }
        let l = l.trim_end().to_string();
        if l.is_empty() {
            return Ok(head);
        }
        head.push(l);
    }
}

/// A chunked transfer-encoded body, decoded.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: usize,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Chunked<R> {
        Chunked { inner, left: 0, done: false }
    }

    /// Reads the next chunk's size line (after the previous chunk's CRLF).
    fn next_chunk(&mut self) -> std::io::Result<()> {
        let mut l = String::new();
        loop {
            l.clear();
            if self.inner.read_line(&mut l)? == 0 {
                self.done = true;
                return Ok(());
            }
            if !l.trim().is_empty() {
                break;
            }
        }
        let size = l.trim().split(';').next().unwrap_or("");
        self.left = usize::from_str_radix(size, 16)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad chunk size {size:?}")))?;
        if self.left == 0 {
            self.done = true;
        }
        Ok(())
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.left == 0 && !self.done {
            self.next_chunk()?;
        }
        if self.done {
            return Ok(0);
        }
        let n = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..n])?;
        if n == 0 {
            self.done = true;
        }
        self.left -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_decoded_across_chunks() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n world\n\r\n1\r\n\n\r\n0\r\n\r\n";
        let mut body = String::new();
        BufReader::new(Chunked::new(&wire[..])).read_to_string(&mut body).unwrap();
        assert_eq!(body, "hello world\n\n");
        let bad = b"zz\r\nhello\r\n";
        assert!(Chunked::new(&bad[..]).read(&mut [0; 8]).is_err());
    }
}
