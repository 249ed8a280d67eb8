//! A configured claim key too weak to protect the fleet is refused at start: fewer than
//! 32 characters, or whitespace only, exit 78 naming the key's setting (or its file),
//! never its value; 32 characters start and onboard. The real binary, against a real
//! mosquitto and the fake Qubitro.

mod common;

use common::*;

const KEY_31: &str = "fleet-key-of-31-characters-xyz!";
const KEY_32: &str = "fleet-key-of-32-characters-xyz!!";

/// onboardd with the shipped `[security]` (proofs required) plus `security`, which
/// must make it exit by itself: its exit code and everything it printed.
async fn refused(security: &str) -> (Option<i32>, String) {
    bin();
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let toml = config_toml(broker.port, &cloud, state.path(), security);
    let mut d = Daemon::from_toml(state.path(), &toml, vec![]);
    let code = d.wait_exit_async().await.code();
    assert!(
        !harness::daemon::store_path(state.path())
            .join("db")
            .exists(),
        "refused before the store is opened"
    );
    (code, d.log.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_claim_key_under_32_characters_exits_78_naming_the_setting_not_the_value() {
    let (code, text) = refused(&format!("[security]\nclaim_key = \"{KEY_31}\"")).await;
    assert_eq!(code, Some(78), "{text}");
    assert!(text.contains("security.claim_key:"), "{text}");
    assert!(text.contains("at least 32 characters"), "{text}");
    assert!(
        !text.contains(KEY_31),
        "the key's value is never shown: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whitespace_only_claim_key_exits_78_even_when_long() {
    let blank = " \t".repeat(20);
    let (code, text) = refused(&format!("[security]\nclaim_key = \"{blank}\"")).await;
    assert_eq!(code, Some(78), "{text}");
    assert!(text.contains("security.claim_key:"), "{text}");
    assert!(text.contains("whitespace"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weak_claim_key_file_exits_78_naming_the_setting_and_the_file_not_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("claim-key");
    std::fs::write(&file, format!("{KEY_31}\n")).unwrap();
    let security = format!("[security]\nclaim_key_file = \"{}\"", file.display());
    let (code, text) = refused(&security).await;
    assert_eq!(code, Some(78), "{text}");
    assert!(text.contains("security.claim_key_file:"), "{text}");
    assert!(text.contains(&file.display().to_string()), "{text}");
    assert!(
        !text.contains(KEY_31),
        "the key's value is never shown: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_32_character_claim_key_starts_and_its_sensors_onboard() {
    bin();
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let security = format!("[security]\nclaim_key = \"{KEY_32}\"");
    let toml = config_toml(broker.port, &cloud, state.path(), &security);
    let d = Daemon::from_toml(state.path(), &toml, vec![]);
    d.wait_subscribed();
    let mut s = Sensor::connect(broker.port, "strong-1", &harness::Flashed::new(KEY_32)).await;
    s.announce("{}").await;
    let ok = s.reply_with_status("ok").await;
    assert_opens_to_the_clouds_token(&cloud, &ok);
}
