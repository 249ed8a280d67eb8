//! What the unit tests share: a plain-HTTP client, a started fake, the usual bodies.

use serde_json::{json, Value};

use crate::shapes::SENSOR_ID_KEY;
use crate::{FakeDevice, FakeOptions, FakeQubitro, NewDevice};

pub(crate) fn client() -> reqwest::Client {
    // reqwest 0.13 wants a rustls provider even for plain http; Err means already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Fresh clients per check where connection reuse could hide what is being tested.
    reqwest::Client::builder()
        .build()
        .expect("plain-http client builds without a TLS provider")
}

pub(crate) fn devices_url(fake: &FakeQubitro) -> String {
    format!(
        "{}/v2/projects/{}/devices",
        fake.base_url(),
        fake.project_id()
    )
}

pub(crate) async fn create(fake: &FakeQubitro, body: Value) -> reqwest::Response {
    client()
        .post(devices_url(fake))
        .bearer_auth(fake.api_key())
        .json(&body)
        .send()
        .await
        .expect("create request reaches the fake")
}

pub(crate) async fn json_of(r: reqwest::Response) -> Value {
    r.json().await.expect("fake answers JSON")
}

pub(crate) fn sensor(name: &str, metadata: Value) -> Value {
    json!({"name": name, "description": "temp sensor", "source": "mqtt",
           "tags": ["gw_1"], "metadata": metadata})
}

pub(crate) async fn start(opts: FakeOptions) -> FakeQubitro {
    FakeQubitro::start(opts)
        .await
        .expect("fake starts on a free port")
}

pub(crate) async fn list_json(fake: &FakeQubitro, query: &str) -> Value {
    let r = client()
        .get(format!("{}{query}", devices_url(fake)))
        .bearer_auth(fake.api_key())
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), 200);
    json_of(r).await
}

pub(crate) fn names(items: &Value) -> Vec<&str> {
    items
        .as_array()
        .expect("an array of items")
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect()
}

pub(crate) fn plant(fake: &FakeQubitro, name: &str, sensor_id: &str) -> FakeDevice {
    let mut d = NewDevice::named(name);
    d.metadata
        .insert(SENSOR_ID_KEY.to_owned(), sensor_id.to_owned());
    fake.insert_device(d)
}
