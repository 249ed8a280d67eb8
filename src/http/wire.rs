//! HTTP/1.1 on the wire, as little of it as /healthz and /metrics need: one
//! request head read with httparse (already linked in for the HTTP client), one
//! response written, the connection closed. A server framework's connection
//! machinery cost more binary than the whole listener (the aarch64 binary has a
//! size budget), and nothing here needs keep-alive, bodies or chunking.

/// Bytes of request line and headers; a longer head is refused.
pub const MAX_HEAD_BYTES: usize = 8192;
/// Headers per request; more are refused.
pub const MAX_HEADERS: usize = 32;

/// What the handlers read of a request.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub authorization: Option<Vec<u8>>,
    /// Announced body length (none is ever read).
    pub content_length: u64,
}

/// What a buffer holding the start of a request amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Complete(Head),
    /// Read more (the buffer is not full yet).
    Partial,
    /// Answer with this status and close.
    Refuse(Response),
}

pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let find = |name: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| h.value)
            };
            let content_length = match find("content-length") {
                None => 0,
                Some(v) => match std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                {
                    Some(n) => n,
                    None => return Parsed::Refuse(Response::text(400, "bad Content-Length\n")),
                },
            };
            if find("transfer-encoding").is_some() {
                return Parsed::Refuse(Response::text(413, "no body expected\n"));
            }
            Parsed::Complete(Head {
                method: req.method.unwrap_or_default().to_string(),
                path: req.path.unwrap_or_default().to_string(),
                authorization: find("authorization").map(<[u8]>::to_vec),
                content_length,
            })
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            Parsed::Refuse(Response::text(431, "request head too large\n"))
        }
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            Parsed::Refuse(Response::text(431, "too many headers\n"))
        }
        Err(_) => Parsed::Refuse(Response::text(400, "bad request\n")),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// One more header line (name, value), e.g. WWW-Authenticate.
    pub extra: Option<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            extra: None,
            body,
        }
    }

    pub fn text(status: u16, body: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", body.to_string())
    }

    pub fn with(mut self, name: &'static str, value: String) -> Response {
        self.extra = Some((name, value));
        self
    }

    /// The bytes to send; a HEAD request gets the head alone.
    pub fn encode(&self, head_only: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            429 => "Too Many Requests",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let extra = self
            .extra
            .as_ref()
            .map(|(n, v)| format!("{n}: {v}\r\n"))
            .unwrap_or_default();
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
                Cache-Control: no-store\r\n{extra}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_head_gives_its_method_path_authorization_and_length() {
        let p = parse(b"GET /metrics HTTP/1.1\r\nHost: g\r\nauthorization: Basic eA==\r\n\r\n");
        assert_eq!(
            p,
            Parsed::Complete(Head {
                method: "GET".into(),
                path: "/metrics".into(),
                authorization: Some(b"Basic eA==".to_vec()),
                content_length: 0,
            })
        );
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHo"), Parsed::Partial);
    }

    #[test]
    fn a_head_too_large_or_with_too_many_headers_or_a_chunked_body_is_refused() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD_BYTES, b'a');
        assert!(matches!(parse(&big), Parsed::Refuse(r) if r.status == 431));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(parse(many.as_bytes()), Parsed::Refuse(r) if r.status == 431));
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse(chunked), Parsed::Refuse(r) if r.status == 413));
        assert!(
            matches!(parse(b"\x01\x02 nonsense\r\n\r\n"), Parsed::Refuse(r) if r.status == 400)
        );
    }

    #[test]
    fn a_head_request_gets_the_length_of_the_body_it_does_not_get() {
        let r = Response::text(200, "hello");
        let head = String::from_utf8(r.encode(true)).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("Content-Length: 5\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert!(String::from_utf8(r.encode(false))
            .unwrap()
            .ends_with("\r\n\r\nhello"));
    }
}
