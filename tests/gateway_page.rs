//! The gateway page through the real daemon, a real mosquitto and the fake Qubitro:
//! plain HTTP for each piece (listing, search, pages of 100, the sensors waiting, a
//! sensor's events, the forget with its token and confirmation), and a real headless
//! chromium for what a user does with it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::webdriver::Browser;
use common::*;
use fake_qubitro::{Endpoint, FakeQubitro};

/// One request over a fresh connection: (status, head, body).
fn request(port: u16, method: &str, path: &str, form: Option<&str>) -> (u16, String, String) {
    request_with(port, method, path, form, "")
}

/// As [`request`], with more header lines.
fn request_with(
    port: u16,
    method: &str,
    path: &str,
    form: Option<&str>,
    headers: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the http listener");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let body = form.unwrap_or("");
    let typed = if form.is_some() {
        format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        )
    } else {
        String::new()
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n{typed}{headers}\r\n{body}"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status");
    (status, head.to_string(), body.to_string())
}

/// A POST of `form` to a sensor's forget.
fn forget(port: u16, sensor: &str, form: &str) -> (u16, String, String) {
    request(
        port,
        "POST",
        &format!("/sensor/{sensor}/forget"),
        Some(form),
    )
}

fn get(port: u16, path: &str) -> String {
    let (status, _, body) = request(port, "GET", path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// The sensor ids linked from the sensors table of a listing page.
fn listed(page: &str) -> Vec<String> {
    let table = page
        .split("<table id=\"sensors\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or("");
    table
        .split("<tr><td><a href=\"/sensor/")
        .skip(1)
        .map(|r| r.split('"').next().unwrap_or_default().to_string())
        .collect()
}

/// The forget form's token on a sensor's page.
fn token_of(page: &str) -> String {
    let at = page.find("name=\"token\" value=\"").expect("a token field") + 20;
    page[at..].split('"').next().unwrap().to_string()
}

/// A broker, the fake Qubitro, and a daemon whose page listens on a free loopback port.
async fn daemon_with_page() -> (Mosquitto, FakeQubitro, u16, Daemon) {
    daemon_with_page_and(fake_cloud().await).await
}

/// As [`daemon_with_page`], with this fake Qubitro.
async fn daemon_with_page_and(cloud: FakeQubitro) -> (Mosquitto, FakeQubitro, u16, Daemon) {
    common::bin();
    let broker = Mosquitto::start();
    let d = Daemon::start(&broker, &cloud, "[http]\nlisten = \"127.0.0.1:0\"\n");
    let port = d.http_port();
    (broker, cloud, port, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_lists_searches_and_pages_the_sensors_shows_those_waiting_and_no_token_or_key() {
    let (broker, _cloud, port, d) = daemon_with_page().await;
    let mut all = d.fleet(broker.port).await;
    for i in 0..120 {
        let name = if i == 77 { "Greenhouse north" } else { "Room" };
        all.announce_on(
            &format!("onboard/announce/pg-{i:03}"),
            &format!(r#"{{"name":"{name}"}}"#),
        )
        .await;
    }
    let ok = all.ok_replies_of(120, Duration::from_secs(60)).await;
    let mut stranger = Sensor::connect_unkeyed(broker.port, "stranger-1").await;
    stranger.announce("{}").await;
    let refused = stranger.unauthenticated_reply().await;

    let first = get(port, "/");
    let ids = listed(&first);
    assert_eq!(ids.len(), 100, "a page of 100");
    assert_eq!(ids[0], "pg-000");
    assert_eq!(ids[99], "pg-099");
    assert!(first.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
    assert!(first.contains("name=\"viewport\""));
    let device_77 = ok["pg-077"]["device_id"].as_str().unwrap();
    assert!(first.contains(device_77), "the device id is shown");
    assert!(first.contains("delivered"), "the state is shown");
    let next = get(port, "/?after=pg-099");
    assert_eq!(listed(&next).len(), 20);
    assert_eq!(listed(&next)[0], "pg-100");
    assert!(
        !next.contains("id=\"next\""),
        "the last page links no further"
    );
    assert!(first.contains("href=\"/?after=pg-099\""), "{first}");

    assert_eq!(
        listed(&get(port, "/?q=pg-11")),
        (110..120).map(|i| format!("pg-{i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        listed(&get(port, "/?q=greenhouse")),
        ["pg-077"],
        "by name, any case"
    );
    assert_eq!(
        listed(&get(port, "/?q=-07")).len(),
        10,
        "by a part of the id"
    );

    let code = refused["code"].as_str().unwrap();
    let waiting = first
        .split("<table id=\"waiting\">")
        .nth(1)
        .expect("a waiting table");
    assert!(
        waiting.contains("stranger-1") && waiting.contains(code),
        "the refused sensor waits with its reason ({code}): {waiting}"
    );

    let sensor = get(port, "/sensor/pg-077");
    assert!(
        sensor.contains("Greenhouse north") && sensor.contains(device_77),
        "{sensor}"
    );
    assert!(sensor.contains("onboarding pg-077"), "its events: {sensor}");
    let (status, _, confirm) = forget(port, "pg-077", &format!("token={}", token_of(&sensor)));
    assert_eq!(status, 200);

    let key = d.claim_key();
    let (status, _, unknown) = request(port, "GET", "/sensor/stranger-1", None);
    assert_eq!(status, 404, "a sensor the gateway does not know");
    assert!(
        unknown.contains("refused (unauthorized)"),
        "but its events are shown: {unknown}"
    );
    for page in [&first, &next, &sensor, &confirm, &unknown] {
        assert!(!page.contains(&key), "the claim key is on a page");
        for r in ok.values() {
            assert!(!page.contains(r.token()), "a device token is on a page");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_needs_the_pages_token_and_a_confirmation_then_the_store_and_devices_list_agree() {
    let (broker, cloud, port, d) = daemon_with_page().await;
    let mut s = d.sensor(broker.port, "fg-1").await;
    s.announce(r#"{"name":"<script>alert(1)</script>"}"#).await;
    let ok = s.reply_with_status("ok").await;
    let page = get(port, "/sensor/fg-1");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !page.contains("<script>"),
        "{page}"
    );
    let token = token_of(&page);

    for bad in ["", "token=", "token=00", &format!("token={token}x")] {
        let form = format!("{bad}&confirm=yes");
        let (status, _, _) = forget(port, "fg-1", &form);
        assert_eq!(status, 403, "{form}");
    }
    let (status, _, _) = forget(port, "fg-2", &format!("token={token}&confirm=yes"));
    assert_eq!(
        status, 403,
        "a token forgets only the sensor whose page gave it"
    );
    let (status, _, _) = request(port, "GET", "/sensor/fg-1/forget", None);
    assert_eq!(status, 405);
    assert_eq!(
        d.state_of("fg-1").as_deref(),
        Some("delivered"),
        "nothing was forgotten"
    );

    let (status, _, confirm) = forget(port, "fg-1", &format!("token={token}"));
    assert_eq!(status, 200);
    assert!(
        confirm.contains("Forget fg-1?") && confirm.contains(ok["device_id"].as_str().unwrap()),
        "{confirm}"
    );
    assert_eq!(
        d.state_of("fg-1").as_deref(),
        Some("delivered"),
        "asking is not forgetting"
    );

    let (status, head, _) = forget(port, "fg-1", &format!("token={token}&confirm=yes"));
    assert_eq!(status, 303, "{head}");
    assert!(head.contains("\r\nLocation: /\r\n"), "{head}");
    assert_eq!(d.state_of("fg-1"), None, "the store forgot it");
    let (code, list, err) = d.devices(&["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(!list.contains("fg-1"), "{list}");
    assert_eq!(
        cloud.devices().len(),
        1,
        "the Qubitro device is kept unless asked"
    );
    assert!(listed(&get(port, "/")).is_empty());
    let (status, _, _) = forget(port, "fg-1", &"x=".repeat(2100));
    assert_eq!(status, 413, "a body over 4 KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_password_the_page_and_its_forget_need_it_too() {
    common::bin();
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let (extra, _password_dir) = http_with_password("127.0.0.1", 0, "correct horse");
    let d = Daemon::start(&broker, &cloud, &extra);
    let port = d.http_port();
    let mut s = d.sensor(broker.port, "pw-1").await;
    s.announce("{}").await;
    s.reply_with_status("ok").await;
    use base64::Engine as _;
    let auth = format!(
        "Authorization: Basic {}\r\n",
        base64::engine::general_purpose::STANDARD.encode("me:correct horse")
    );

    assert_eq!(request(port, "GET", "/", None).0, 401);
    let (status, _, page) = request_with(port, "GET", "/sensor/pw-1", None, &auth);
    assert_eq!(status, 200, "{page}");
    let form = format!("token={}&confirm=yes&delete_remote=yes", token_of(&page));
    let (status, _, _) = forget(port, "pw-1", &form);
    assert_eq!(status, 401, "a valid token is not a password");
    assert_eq!(d.state_of("pw-1").as_deref(), Some("delivered"));
    let path = "/sensor/pw-1/forget";
    let (status, head, _) = request_with(port, "POST", path, Some(&form), &auth);
    assert_eq!(status, 303, "{head}");
    assert_eq!(d.state_of("pw-1"), None);
    assert!(
        cloud.devices().is_empty(),
        "the box asked for the device's delete"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_that_also_deletes_the_device_forgets_nothing_when_qubitro_refuses_the_delete() {
    let refusing = fake_qubitro::FakeOptions {
        delete_permission: false,
        ..fake_qubitro::FakeOptions::default()
    };
    let cloud = FakeQubitro::start(refusing)
        .await
        .expect("start the fake Qubitro");
    let (broker, cloud, port, d) = daemon_with_page_and(cloud).await;
    let mut s = d.sensor(broker.port, "kept-1").await;
    s.announce("{}").await;
    s.reply_with_status("ok").await;
    let token = token_of(&get(port, "/sensor/kept-1"));
    let form = format!("token={token}&confirm=yes&delete_remote=yes");
    let (status, _, body) = forget(port, "kept-1", &form);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("nothing was forgotten"), "{body}");
    assert!(!body.contains(&cloud.api_key()), "{body}");
    assert_eq!(d.state_of("kept-1").as_deref(), Some("delivered"));
    assert_eq!(cloud.devices().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_broker_is_down_the_page_says_so_with_the_reason() {
    let (mut broker, _cloud, port, _d) = daemon_with_page().await;
    page_until(port, "<span class=\"ok\">connected</span>");
    broker.kill();
    let page = page_until(port, "disconnected: ");
    let why = page
        .split("disconnected: ")
        .nth(1)
        .unwrap()
        .split("</span>")
        .next()
        .unwrap();
    assert!(!why.trim().is_empty(), "{page}");
}

/// `/` once it contains `needle` (the daemon sees the broker change on its own time).
fn page_until(port: u16, needle: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let page = get(port, "/");
        if page.contains(needle) {
            return page;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {needle:?} on {page}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_real_browser_the_page_lists_finds_shows_and_forgets_a_sensor() {
    let (broker, cloud, port, d) = daemon_with_page().await;
    let mut sensors = Vec::new();
    for (id, name) in [
        ("greenhouse-t1", "Greenhouse temperature"),
        ("cellar-h2", "Cellar humidity"),
        ("attic-t3", "Attic"),
    ] {
        let mut s = d.sensor(broker.port, id).await;
        s.announce(&format!(r#"{{"name":"{name}"}}"#)).await;
        let ok = s.reply_with_status("ok").await;
        sensors.push((id, ok));
    }
    let device = sensors[1].1["device_id"].as_str().unwrap().to_string();
    // Two waiting: one whose onboarding Qubitro keeps failing, one refused.
    cloud.push_faults(Endpoint::List, (0..50).map(|_| status_fault(503)).collect());
    let mut pump = d.sensor(broker.port, "pump-p4").await;
    pump.announce(r#"{"name":"Pump"}"#).await;
    pump.reply_with_status("pending").await;
    let mut stranger = Sensor::connect_unkeyed(broker.port, "stranger-9").await;
    stranger.announce("{}").await;
    stranger.unauthenticated_reply().await;
    let base = format!("http://127.0.0.1:{port}");
    let browser = Browser::start().await;

    browser.goto(&format!("{base}/")).await;
    let text = browser.find("#sensors").await.text().await;
    assert!(
        text.contains("cellar-h2") && text.contains("delivered") && text.contains(&device),
        "{text}"
    );
    let waiting = browser.find("#waiting").await.text().await;
    assert!(
        waiting.contains("pump-p4") && waiting.contains("stranger-9"),
        "{waiting}"
    );
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("gateway-page.png");
    browser.screenshot(&shot).await;
    if let Ok(path) = std::env::var("ONBOARDD_PAGE_SCREENSHOT") {
        std::fs::copy(&shot, path).expect("copy the screenshot");
    }

    browser
        .find("input[name=q]")
        .await
        .send_keys("cellar")
        .await;
    browser.find("form[action='/'] button").await.click().await;
    browser.wait_until_at("/?q=cellar").await;
    let found = browser.find("#sensors").await.text().await;
    assert!(
        found.contains("cellar-h2") && !found.contains("attic-t3"),
        "{found}"
    );

    browser.find("#sensors a").await.click().await;
    browser.wait_until_at("/sensor/cellar-h2").await;
    let events = browser.find("#events").await.text().await;
    assert!(
        events.contains("onboarding cellar-h2"),
        "its events: {events}"
    );

    browser.find("#forget").await.click().await;
    browser.wait_until_at("/sensor/cellar-h2/forget").await;
    assert!(browser.text().await.contains("Forget cellar-h2?"));
    browser.find("#confirm").await.click().await;
    // Back to the list: the 303 leads to `/`.
    browser.wait_until_at(&format!("{base}/")).await;
    let text = browser.find("#sensors").await.text().await;
    assert!(
        !text.contains("cellar-h2") && text.contains("attic-t3"),
        "{text}"
    );
    assert_eq!(d.state_of("cellar-h2"), None, "the store forgot it");
    let (code, list, _) = d.devices(&["list"]);
    assert_eq!(code, 0);
    assert!(
        !list.contains("cellar-h2") && list.contains("attic-t3"),
        "{list}"
    );
    browser.quit().await;
}
