//! HTTP/1.1 on the wire, as little of it as the listener needs: one request head
//! read with httparse (already linked in for the HTTP client), a small
//! form-urlencoded body for the gateway page's POSTs (Content-Length only, at most
//! [`MAX_BODY_BYTES`]), one response written, the connection closed. A server
//! framework's connection machinery cost more binary than the whole listener (the
//! aarch64 binary has a size budget), and nothing here needs keep-alive or chunking.

/// Bytes of request line and headers; a longer head is refused.
pub const MAX_HEAD_BYTES: usize = 8192;
/// Headers per request; more are refused.
pub const MAX_HEADERS: usize = 32;
/// Bytes of request body: a form of a few fields (the page's forget form is
/// under 200 bytes); a larger one is refused before it is read.
pub const MAX_BODY_BYTES: usize = 4096;
const FORM: &str = "application/x-www-form-urlencoded";

/// What the handlers read of a request.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub authorization: Option<Vec<u8>>,
    /// Announced body length ([`body_len`] says whether it is read).
    pub content_length: u64,
    pub content_type: Option<String>,
    /// Bytes of the head: the body starts there.
    pub head_len: usize,
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
        Ok(httparse::Status::Complete(head_len)) => {
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
                return Parsed::Refuse(Response::text(
                    413,
                    "chunked bodies are not taken: send a Content-Length\n",
                ));
            }
            Parsed::Complete(Head {
                method: req.method.unwrap_or_default().to_string(),
                path: req.path.unwrap_or_default().to_string(),
                authorization: find("authorization").map(<[u8]>::to_vec),
                content_length,
                content_type: find("content-type").map(|v| String::from_utf8_lossy(v).into_owned()),
                head_len,
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

/// How many body bytes to read after the head, or the refusal to send unread: a
/// body only as a form, only up to [`MAX_BODY_BYTES`].
pub fn body_len(head: &Head) -> Result<usize, Response> {
    if head.content_length == 0 {
        return Ok(0);
    }
    if head.content_length > MAX_BODY_BYTES as u64 {
        let why = format!("request body over {MAX_BODY_BYTES} bytes\n");
        return Err(Response::new(413, "text/plain; charset=utf-8", why));
    }
    let media = head
        .content_type
        .as_deref()
        .and_then(|t| t.split(';').next())
        .map(str::trim);
    if !media.is_some_and(|m| m.eq_ignore_ascii_case(FORM)) {
        return Err(Response::text(
            400,
            "a request body must be application/x-www-form-urlencoded\n",
        ));
    }
    Ok(head.content_length as usize)
}

/// The fields of a form-urlencoded body or query string, in order.
pub fn parse_form(text: &[u8]) -> Result<Vec<(String, String)>, Response> {
    let bad = || Response::text(400, "a form field is not valid percent-encoded UTF-8\n");
    let text = std::str::from_utf8(text).map_err(|_| bad())?;
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k).ok_or_else(bad)?, decode(v).ok_or_else(bad)?))
        })
        .collect()
}

/// Percent-decoding with `+` as a space (forms and query strings); None when an
/// escape is malformed or the bytes are not UTF-8.
pub fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `s` percent-encoded for a path segment or a query value: everything but
/// unreserved characters escaped.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// More header lines (name, value), e.g. WWW-Authenticate.
    pub extra: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            extra: Vec::new(),
            body,
        }
    }

    pub fn text(status: u16, body: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", body.to_string())
    }

    pub fn with(mut self, name: &'static str, value: String) -> Response {
        self.extra.push((name, value));
        self
    }

    /// The bytes to send; a HEAD request gets the head alone.
    pub fn encode(&self, head_only: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            303 => "See Other",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            429 => "Too Many Requests",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            _ => "",
        };
        let extra: String = self
            .extra
            .iter()
            .map(|(n, v)| format!("{n}: {v}\r\n"))
            .collect();
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
                content_type: None,
                head_len: 61,
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

    fn post(headers: &str) -> Head {
        match parse(format!("POST /x HTTP/1.1\r\n{headers}\r\n").as_bytes()) {
            Parsed::Complete(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_small_form_body_is_read_and_anything_else_is_refused_unread() {
        let form = "Content-Type: application/x-www-form-urlencoded; charset=utf-8\r\n";
        assert_eq!(
            body_len(&post(&format!("{form}Content-Length: 20\r\n"))),
            Ok(20)
        );
        assert_eq!(body_len(&post("")), Ok(0), "no body at all is fine");
        let big = body_len(&post(&format!("{form}Content-Length: 4097\r\n"))).unwrap_err();
        assert_eq!(big.status, 413);
        assert!(big.body.contains("over 4096 bytes"), "{}", big.body);
        let json = body_len(&post(
            "Content-Type: application/json\r\nContent-Length: 2\r\n",
        ))
        .unwrap_err();
        assert_eq!(json.status, 400);
        assert!(json.body.contains("x-www-form-urlencoded"), "{}", json.body);
        let untyped = body_len(&post("Content-Length: 2\r\n")).unwrap_err();
        assert_eq!(untyped.status, 400);
        let p = parse(b"POST /x HTTP/1.1\r\nContent-Length: x\r\n\r\n");
        assert!(matches!(p, Parsed::Refuse(r) if r.status == 400));
    }

    #[test]
    fn a_form_decodes_percent_escapes_and_plus_signs() {
        let f = parse_form(b"token=a%2Fb%3D&confirm=yes&q=hello+w%C3%B6rld&flag").unwrap();
        let want = [
            ("token", "a/b="),
            ("confirm", "yes"),
            ("q", "hello w\u{f6}rld"),
            ("flag", ""),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(f, want);
        assert_eq!(parse_form(b"a=%zz").unwrap_err().status, 400);
        assert_eq!(parse_form(b"a=%2").unwrap_err().status, 400);
        assert_eq!(parse_form(b"a=%ff").unwrap_err().status, 400, "not UTF-8");
        assert_eq!(decode(&encode("a b/<é>&?")).as_deref(), Some("a b/<é>&?"));
        assert_eq!(encode("s-1_a.b~"), "s-1_a.b~");
    }
}
