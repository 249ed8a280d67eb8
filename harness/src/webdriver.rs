//! A real headless browser for the gateway page's tests: Debian's `chromium` driven by
//! its `chromedriver` over the W3C WebDriver HTTP protocol, with reqwest. Only the
//! commands the tests use: navigate, find by CSS, type, click, read the page, screenshot.
//!
//! A missing `chromium` or `chromedriver` fails the test (like a missing mosquitto):
//! `scripts/install-deps.sh test` installs both.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::process::{LogLines, Proc};
use crate::{free_port, WAIT};

/// The key under which WebDriver names an element.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process with one headless chromium session; both end on drop.
pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>/session/<id>`.
    session: String,
    _driver: Proc,
}

/// An element of the current page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: the gateway page's browser test needs Debian's {package} \
         (scripts/install-deps.sh test installs it)"
    );
}

impl Browser {
    /// Starts chromedriver on a free port and a headless chromium session in it.
    pub async fn start() -> Browser {
        require("chromium", "chromium");
        require("chromedriver", "chromium-driver");
        let port = free_port();
        let driver = Proc::spawn(
            "chromedriver",
            Command::new("chromedriver").arg(format!("--port={port}")),
            LogLines::default(),
        )
        .expect("start chromedriver");
        driver.log.wait_for("was started successfully");
        // Err: already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("an HTTP client");
        let base = format!("http://127.0.0.1:{port}");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                // --no-sandbox: the tests may run as root, where chromium's sandbox refuses.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900"]
            }
        }}});
        let started = Instant::now();
        let answer = loop {
            let r = http
                .post(format!("{base}/session"))
                .json(&caps)
                .send()
                .await;
            match r {
                Ok(r) => {
                    break r
                        .json::<Value>()
                        .await
                        .expect("a JSON answer to new session")
                }
                Err(e) if started.elapsed() < WAIT => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("chromedriver on port {port} does not answer: {e}"),
            }
        };
        let id = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no chromium session: {answer}"));
        Browser {
            http,
            session: format!("{base}/session/{id}"),
            _driver: driver,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.session);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = r.status();
        let v: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        assert!(status.is_success(), "{method} {url}: {status}: {v}");
        v["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Loads `url` and waits for it (WebDriver returns once the page has loaded).
    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    pub async fn url(&self) -> String {
        self.get("/url")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the browser shows a fully loaded page whose URL ends with `suffix`:
    /// a click on a form's button returns before the next page has loaded.
    pub async fn wait_until_at(&self, suffix: &str) {
        let started = Instant::now();
        loop {
            let url = self.url().await;
            let ready = self
                .post(
                    "/execute/sync",
                    json!({"script": "return document.readyState", "args": []}),
                )
                .await;
            if url.ends_with(suffix) && ready == "complete" {
                return;
            }
            assert!(
                started.elapsed() < WAIT,
                "the browser is at {url} ({ready}), not at …{suffix}, after {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The current page's HTML as the browser holds it.
    pub async fn source(&self) -> String {
        self.get("/source")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The page's text as a user reads it.
    pub async fn text(&self) -> String {
        self.find("body").await.text().await
    }

    /// The first element matching `css`; panics with the page when there is none.
    pub async fn find(&self, css: &str) -> Element<'_> {
        let url = format!("{}/element", self.session);
        let r = self
            .http
            .post(&url)
            .json(&json!({"using": "css selector", "value": css}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let ok = r.status().is_success();
        let v: Value = r.json().await.unwrap_or_default();
        if !ok {
            panic!(
                "no element {css:?} on {}: {v}\n{}",
                self.url().await,
                self.source().await
            );
        }
        let id = v["value"][ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element id in {v}"));
        Element {
            browser: self,
            id: id.to_string(),
        }
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let b64 = self.get("/screenshot").await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("a base64 screenshot"))
            .expect("base64");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Ends the session (chromium exits); the driver ends on drop.
    pub async fn quit(self) {
        self.call(reqwest::Method::DELETE, "", None).await;
    }
}

impl Element<'_> {
    fn path(&self, what: &str) -> String {
        format!("/element/{}/{what}", self.id)
    }

    pub async fn click(&self) {
        self.browser.post(&self.path("click"), json!({})).await;
    }

    pub async fn send_keys(&self, text: &str) {
        self.browser
            .post(&self.path("value"), json!({ "text": text }))
            .await;
    }

    pub async fn text(&self) -> String {
        self.browser
            .get(&self.path("text"))
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}
