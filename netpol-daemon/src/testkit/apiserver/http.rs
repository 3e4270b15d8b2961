//! HTTP/1.1 as the API server speaks it to kube-rs (hyper): keep-alive connections carrying
//! requests with `Content-Length` bodies, JSON responses with a length, and watch responses in
//! chunked transfer encoding, one JSON event per line.
use std::io::{self, BufRead, Write};

/// A request as read off the wire; the query is percent-decoded.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub content_type: String,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

impl Request {
    /// The value of query parameter `name` (the first one given).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The parameter is `true` (or `1`, as Go's strconv.ParseBool also accepts).
    pub fn flag(&self, name: &str) -> bool {
        matches!(self.param(name), Some("true" | "1" | "True" | "TRUE" | "t"))
    }
}

/// The next request on a connection; None when the client closed it.
pub fn read_request(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut words = line.split_whitespace();
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad request line {line:?}")));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut req = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: parse_query(query),
        content_type: String::new(),
        body: vec![],
        close: false,
    };
    let mut length = 0;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().unwrap_or(0),
            "content-type" => req.content_type = value.to_string(),
            "connection" => req.close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    req.body = vec![0; length];
    r.read_exact(&mut req.body)?;
    Ok(Some(req))
}

/// `a=1&b=x%2Cy` -> [("a", "1"), ("b", "x,y")]
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let (mut out, mut i) = (Vec::with_capacity(b.len()), 0);
    while i < b.len() {
        let hex = (b[i] == b'%').then(|| s.get(i + 1..i + 3)).flatten().and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        415 => "Unsupported Media Type",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// A whole JSON response, in one write.
pub fn respond(w: &mut impl Write, code: u16, body: &[u8]) -> io::Result<()> {
    let head =
        format!("HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", reason_phrase(code), body.len());
    w.write_all(&[head.as_bytes(), body].concat())?;
    w.flush()
}

/// A response sent in chunks (a watch stream).
pub struct Chunked<'a, W: Write> {
    w: &'a mut W,
}

impl<'a, W: Write> Chunked<'a, W> {
    /// Sends the status line and headers.
    pub fn start(w: &'a mut W) -> io::Result<Chunked<'a, W>> {
        write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")?;
        w.flush()?;
        Ok(Chunked { w })
    }

    /// One chunk, in one write (no partial event waits on Nagle's algorithm), flushed.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.w.write_all(&[format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat())?;
        self.w.flush()
    }

    /// The end of the response: the connection can carry another request.
    pub fn finish(self) -> io::Result<()> {
        self.w.write_all(b"0\r\n\r\n")?;
        self.w.flush()
    }

    /// Breaks off mid-stream: half a chunk (the start of an event), then the caller closes the
    /// connection, as a crashing server or a cut network would.
    pub fn cut(self) {
        let _ = self.w.write_all(b"40\r\n{\"type\":\"MODIFIED\",\"object\":");
        let _ = self.w.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_and_decoded() {
        let raw = "GET /api/v1/pods?fieldSelector=status.phase%21%3DFailed&limit=500&x=a+b HTTP/1.1\r\nHost: h\r\n\r\n\
                   POST /apis/events.k8s.io/v1/namespaces/a/events HTTP/1.1\r\n\
                   Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
        let mut r = io::BufReader::new(raw.as_bytes());
        let get = read_request(&mut r).unwrap().unwrap();
        assert_eq!((get.method.as_str(), get.path.as_str()), ("GET", "/api/v1/pods"));
        assert_eq!(
            (get.param("fieldSelector"), get.param("limit"), get.param("x")),
            (Some("status.phase!=Failed"), Some("500"), Some("a b"))
        );
        let post = read_request(&mut r).unwrap().unwrap();
        assert_eq!((post.body.as_slice(), post.close, post.content_type.as_str()), (&b"{}"[..], true, "application/json"));
        assert!(read_request(&mut r).unwrap().is_none());
    }
}
