//! Precedence, checks and the file's keys, from one declaration.

use super::*;

#[test]
fn flags_beat_the_file_which_beats_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        "role = \"agent\"\nslots = 7\napi_listen = \"127.0.0.1:9000\"\n",
    )
    .expect("write");
    let c = Config::load([
        "caroni-node",
        "--config",
        file.to_str().expect("utf8"),
        "--slots",
        "3",
    ])
    .expect("valid");
    assert_eq!(c.role, Role::Agent); // from the file
    assert_eq!(c.slots, 3); // flag beats file
    assert_eq!(c.api_listen.port(), 9000); // file beats default
    assert_eq!(c.lease_seconds, 30); // default
}

/// One declaration gives the flag, the variable, the file key and the
/// default: the environment beats the file, a flag beats both, and a
/// bad value in the file is refused naming the file.
#[test]
fn the_environment_beats_the_file_and_file_values_are_checked_as_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        "offer_window_ms = 7\nmax_open_requests = 9\nuse_agents = []\nrole = \"manager\"\n",
    )
    .expect("write");
    // Each test runs in its own process under nextest; no other test
    // reads this setting, so `cargo test`'s threads are safe too.
    std::env::set_var("CARONI_OFFER_WINDOW_MS", "11");
    let path = file.to_str().expect("utf8");
    let c = Config::load(["caroni-node", "--config", path]).expect("valid");
    assert_eq!(c.offer_window_ms, 11, "the environment beats the file");
    assert_eq!(c.max_open_requests, 9, "the file beats the default");
    assert_eq!(c.role, Role::Manager);
    let c =
        Config::load(["caroni-node", "--config", path, "--offer-window-ms", "13"]).expect("valid");
    assert_eq!(c.offer_window_ms, 13, "a flag beats the environment");
    assert_eq!(
        c.manager_options("m", "http://m:1")
            .offer_window
            .as_millis(),
        13
    );
    std::fs::write(&file, "slots = \"many\"\n").expect("write");
    let e = Config::load(["caroni-node", "--config", path]).expect_err("not a number");
    let e = e.to_string();
    assert!(e.contains("node.toml") && e.contains("many"), "{e}");
}

#[test]
fn exposed_api_without_token_is_refused() {
    let e = Config::load(["caroni-node", "--api-listen", "0.0.0.0:7070"]).expect_err("needs token");
    assert!(e.to_string().contains("needs a token"), "{e}");
    assert!(
        Config::load(["caroni-node", "--peer-advertise", "http://0.0.0.0:7071"])
            .expect_err("wildcard")
            .to_string()
            .contains("wildcard")
    );
}

#[test]
fn the_console_is_on_loopback_by_default_and_needs_a_token_elsewhere() {
    let c = Config::load(["caroni-node"]).expect("defaults");
    assert_eq!(
        c.console_listen.0,
        Some(SocketAddr::from(([127, 0, 0, 1], 7073)))
    );
    let c = Config::load(["caroni-node", "--console-listen", "off"]).expect("off");
    assert_eq!(c.console_listen.0, None);
    let e = Config::load(["caroni-node", "--console-listen", "0.0.0.0:7073"])
        .expect_err("needs a token");
    assert!(e.to_string().contains("needs a token"), "{e}");
    let e = Config::load(["caroni-node", "--console-listen", "nowhere"]).expect_err("bad address");
    assert!(e.to_string().contains("`nowhere`"), "{e}");
}

#[test]
fn unknown_file_keys_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "slot = 3\n").expect("write");
    let e =
        Config::load(["caroni-node", "--config", file.to_str().expect("utf8")]).expect_err("typo");
    assert!(e.to_string().contains("unknown field `slot`"), "{e}");
}

/// Any configuration file text gives a configuration or an error,
/// never a panic (`make fuzz` runs 100,000 cases).
#[test]
fn configuration_files_never_panic() {
    use proptest::prelude::*;
    let cases = std::env::var("CARONI_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("caroni.toml");
    let start = std::time::Instant::now();
    let keys = prop_oneof![
        Just("role"),
        Just("api_listen"),
        Just("peer_listen"),
        Just("peer_advertise"),
        Just("p2p_listen"),
        Just("bootstrap"),
        Just("mdns"),
        Just("slots"),
        Just("lease_seconds"),
        Just("request_ttl_seconds"),
        Just("api_token"),
        Just("max_open_requests"),
        Just("offer_window_ms"),
        Just("log_format"),
        Just("data_dir"),
        Just("peer_tls"),
        Just("mesh_key"),
        Just("serve_managers"),
        Just("use_agents"),
        Just("api_tls_cert"),
        Just("api_tls_key"),
        Just("console_listen"),
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        ".{0,40}".prop_map(|s| format!("{s:?}")),
        Just("[\"a\", 1]".to_string()),
        ".{0,20}",
    ];
    proptest!(
        ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() },
        |(lines in proptest::collection::vec((keys, value), 0..6), raw in ".{0,200}")| {
            let text: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
            for t in [text, raw] {
                std::fs::write(&path, t).expect("write");
                let _ = Config::load(["caroni-node".as_ref(), "--config".as_ref(), path.as_os_str()]);
            }
        }
    );
    println!(
        "configuration files: {cases} cases in {:.1} s, no panic",
        start.elapsed().as_secs_f64()
    );
}
