//! Issue 19: the defects a hostile probe found, each against real
//! `caroni-node` processes on loopback. Items 1 and 2 (the console in a
//! browser) are in `console.rs`; the CWL nesting bound (item 7) is a
//! property test of `caroni-cwl`; the Slurm items (9, 10) are in
//! `executors.rs`.

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use caroni_tests::{caroni, http, run_bounded, NodeProc};

fn token_node(dir: &std::path::Path) -> NodeProc {
    NodeProc::start(&dir.join("n"), "both", &["--api-token", "s3cret"]).expect("node")
}

/// Item 3: every answer of the console forbids framing, sniffing and
/// referrers, and its policy allows only the embedded assets.
#[test]
fn safety_03_the_console_cannot_be_framed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    for path in ["/", "/assets/app.js", "/api/node", "/no-such-page"] {
        let a = http(&n.console_addr(), "GET", path, &[], "").expect("get");
        let csp = a.header("content-security-policy").unwrap_or_default();
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(a.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(
            a.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(a.header("referrer-policy"), Some("no-referrer"), "{path}");
    }
}

/// Item 4: a cross-site form cannot log a user out (nor in): `/logout`
/// and `/login` want the header a form cannot send, and the session
/// still works after the attempt.
#[test]
fn safety_04_logout_is_protected_against_cross_site_forms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = token_node(dir.path());
    let session = n.console_login("s3cret").expect("login");
    let form = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("origin", "http://127.0.0.1:1"),
        ("x-caroni-session", session.as_str()),
    ];
    let a = http(&n.console_addr(), "POST", "/logout", &form[..2], "").expect("logout");
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("x-caroni-console"), "{}", a.body);
    // Even carrying the session (which a form cannot), no CSRF header: refused.
    let a = http(&n.console_addr(), "POST", "/logout", &form, "").expect("logout");
    assert_eq!(a.status, 403, "{}", a.body);
    let a = http(
        &n.console_addr(),
        "POST",
        "/login",
        &form[..2],
        "token=s3cret",
    )
    .expect("login");
    assert_eq!(a.status, 403, "{}", a.body);
    let still = http(
        &n.console_addr(),
        "GET",
        "/api/node",
        &[("x-caroni-session", &session)],
        "",
    )
    .expect("api");
    assert_eq!(still.status, 200, "the session ended: {}", still.body);
    // The console's own logout (session and header) ends it.
    let a = http(
        &n.console_addr(),
        "POST",
        "/logout",
        &[("x-caroni-session", &session), ("x-caroni-console", "1")],
        "",
    )
    .expect("logout");
    assert_eq!(a.status, 200, "{}", a.body);
    let after = http(
        &n.console_addr(),
        "GET",
        "/api/node",
        &[("x-caroni-session", &session)],
        "",
    )
    .expect("api");
    assert_eq!(after.status, 401);
}

fn warn_lines(n: &NodeProc, what: &str) -> usize {
    n.log_text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("refused a wrong token") && l.contains(what))
        .count()
}

/// Item 5: wrong tokens, on the console's login and on the client API,
/// make the address wait after a few (even for the right token), and are
/// logged aggregated, not one WARN line each.
#[test]
fn safety_05_guessing_tokens_is_slowed_and_logged_aggregated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = token_node(dir.path());
    let login = |token: &str| {
        http(
            &n.console_addr(),
            "POST",
            "/login",
            &[
                ("content-type", "application/json"),
                ("x-caroni-console", "1"),
            ],
            &serde_json::json!({ "token": token }).to_string(),
        )
        .expect("login")
    };
    let start = Instant::now();
    let statuses: Vec<u16> = (0..40)
        .map(|i| login(&format!("guess{i}")).status)
        .collect();
    eprintln!("40 wrong console logins in {:?}", start.elapsed());
    assert!(statuses[..5].iter().all(|s| *s == 401), "{statuses:?}");
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(limited >= 30, "{statuses:?}");
    let a = login("s3cret");
    assert_eq!(
        a.status, 429,
        "the right token right after a flood: {}",
        a.body
    );
    assert!(a.header("retry-after").is_some());
    assert!(a.body.contains("try the login again in"), "{}", a.body);
    let logged = warn_lines(&n, "console login");
    assert!(
        (1..=7).contains(&logged),
        "{logged} WARN lines for 40 failures"
    );

    // The client API: the same for bearer tokens.
    let wrong = |t: &str| caroni(&n.url(), &["--token", t, "node", "info"]).expect("cli");
    let mut codes = Vec::new();
    for i in 0..12 {
        let out = wrong(&format!("guess{i}"));
        assert!(!out.status.success());
        codes.push(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    assert!(codes[0].contains("wrong API token"), "{}", codes[0]);
    assert!(
        codes[11].contains("too many wrong tokens"),
        "after 12 wrong tokens: {}",
        codes[11]
    );
    let right = caroni(&n.url(), &["--token", "s3cret", "node", "info"]).expect("cli");
    assert!(
        String::from_utf8_lossy(&right.stderr).contains("too many wrong tokens"),
        "the right token right after a flood is refused too"
    );
    let logged = warn_lines(&n, "client API");
    assert!(
        (1..=5).contains(&logged),
        "{logged} WARN lines for 12 failures"
    );
}

/// Item 6: thousands of idle sockets on the console and client API ports
/// (before any login) do not take the node down: health, the API and the
/// console answer meanwhile, and idle sockets are closed by the node.
#[test]
fn safety_06_idle_connections_do_not_take_the_node_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = token_node(dir.path());
    let api = format!("127.0.0.1:{}", n.ports.api);
    let mut idle = Vec::new();
    let start = Instant::now();
    for addr in [&api, &n.console_addr()] {
        for _ in 0..2000 {
            match TcpStream::connect(addr) {
                Ok(s) => idle.push(s),
                Err(e) => panic!("connect {addr} after {} sockets: {e}", idle.len()),
            }
        }
    }
    eprintln!(
        "{} idle sockets opened in {:?}",
        idle.len(),
        start.elapsed()
    );
    let t = Instant::now();
    let mut health = Command::new(caroni_tests::bin("caroni"));
    health.args(["--node", &n.url(), "--token", "s3cret", "health"]);
    let out = run_bounded(health, Duration::from_secs(20)).expect("health");
    assert!(
        out.status.success(),
        "health under 4000 idle sockets: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("health answered in {:?}", t.elapsed());
    n.ok(&["template", "list"]);
    let page = http(&n.console_addr(), "GET", "/", &[], "").expect("console");
    assert_eq!(page.status, 200);
    eprintln!("console answered {:?} after the flood", t.elapsed());
    // The node closes idle sockets (evicted or timed out): reading one
    // gives EOF or an error, not a block.
    let t = Instant::now();
    let mut closed = 0;
    for s in idle.iter_mut().step_by(400) {
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) => closed += 1,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => closed += 1,
            }
            break;
        }
    }
    eprintln!(
        "{closed} sampled idle sockets closed by the node within {:?}",
        t.elapsed()
    );
    assert_eq!(closed, idle.iter().step_by(400).count());
}
