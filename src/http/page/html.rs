//! The gateway page's HTML pieces: [`escape`] for everything that came from the
//! network (sensor ids and names, error texts), the common layout (a viewport and a
//! little CSS so that it reads on a phone; no JavaScript), times as people read them.

use std::fmt::Write as _;

/// `s` safe inside HTML text and double-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0 auto;padding:.5em 1em;max-width:80em;color:#222}\
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}\
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:.9em}\
th,td{text-align:left;padding:.3em .5em;border-bottom:1px solid #ddd;white-space:nowrap}\
td.wrap{white-space:normal}th{background:#f3f3f3}\
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}dd{margin:0}\
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.5em}.bad{color:#a00}.ok{color:#070}\
.ERROR{color:#a00}.WARN{color:#a60}input,button{font-size:1em;padding:.3em}\
button.danger{background:#a00;color:#fff;border:0;padding:.4em 1em}";

/// A whole page; `refresh`: list pages reload themselves every 10 s.
pub fn layout(title: &str, refresh: bool, body: &str) -> String {
    let refresh = if refresh {
        "<meta http-equiv=\"refresh\" content=\"10\">"
    } else {
        ""
    };
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">{refresh}\
         <title>{}</title><style>{STYLE}</style></head><body>{body}</body></html>",
        escape(title)
    )
}

/// How long ago `then_ms` was, from `now_ms` (wall-clock ms): "12 s ago".
pub fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// A span of seconds: "3 d 4 h", "5 min 2 s".
pub fn span(s: u64) -> String {
    let (d, h, m) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    let mut out = String::new();
    if d > 0 {
        let _ = write!(out, "{d} d {h} h");
    } else if h > 0 {
        let _ = write!(out, "{h} h {m} min");
    } else {
        let _ = write!(out, "{m} min {} s", s % 60);
    }
    out
}

/// A wall-clock time in ms as an HTTP date ("Mon, 07 Dec 2026 02:10:00 GMT").
pub fn date(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    httpdate::fmt_http_date(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_leaves_no_markup_from_the_network() {
        let id = "<script>alert('x')</script>\"&";
        let e = escape(id);
        assert_eq!(
            e,
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;"
        );
        assert!(!e.contains('<') && !e.contains('>') && !e.contains('"') && !e.contains('\''));
        assert_eq!(escape("temp-01 é"), "temp-01 é");
    }

    #[test]
    fn times_read_as_people_say_them() {
        assert_eq!(ago(10_000, 5_000), "5 s ago");
        assert_eq!(ago(5_000, 10_000), "0 s ago", "a clock that stepped back");
        assert_eq!(ago(200_000, 0), "3 min ago");
        assert_eq!(span(3 * 86_400 + 4 * 3600 + 5), "3 d 4 h");
        assert_eq!(span(302), "5 min 2 s");
        assert_eq!(date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    #[test]
    fn a_page_has_a_viewport_and_refreshes_only_when_asked() {
        let p = layout("<gw>", true, "<p>x</p>");
        assert!(p.contains("name=\"viewport\""), "{p}");
        assert!(p.contains("http-equiv=\"refresh\" content=\"10\""), "{p}");
        assert!(p.contains("<title>&lt;gw&gt;</title>"), "{p}");
        assert!(!layout("t", false, "").contains("refresh"));
    }
}
