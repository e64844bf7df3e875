//! Issue 19: the defects a hostile probe found, each against real
//! `caroni-node` processes on loopback. Items 1 and 2 (the console in a
//! browser) are in `console.rs`; the CWL nesting bound (item 7) is a
//! property test of `caroni-cwl` (`safety_07_…`); the Slurm items (9,
//! 10) are in `executors.rs`; items 11 and 12 also have unit tests in
//! `caroni-agent`'s executor (`safety_11_…`, `safety_12_…`).

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use caroni_tests::{caroni, http, rss_mb, run_bounded, NodeProc};

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
    let node_page = || {
        http(
            &n.console_addr(),
            "GET",
            "/api/node",
            &[("x-caroni-session", &session)],
            "",
        )
        .expect("api")
    };
    let still = node_page();
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
    assert_eq!(node_page().status, 401);
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
    drop(idle);

    // Slow clients: one that trickles a request's head into the console,
    // one that trickles less than an HTTP/2 preface into the API; the
    // node closes both (within 10 s, the bound on a head and on the first
    // bytes) though neither is ever idle.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for (addr, start, trickle) in [
        (
            n.console_addr(),
            &b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"[..],
            &[b'x'; 64][..],
        ),
        (api.clone(), &preface[..1], &preface[1..]),
    ] {
        use std::io::Write;
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.write_all(start).expect("write");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let t = Instant::now();
        let mut bytes = trickle.iter();
        let closed = loop {
            let Some(byte) = bytes.next() else {
                panic!(
                    "{addr}: a client trickling a byte every 0.5 s stayed open for {:?}",
                    t.elapsed()
                );
            };
            if s.write_all(&[*byte]).is_err() {
                break t.elapsed();
            }
            let mut b = [0u8; 256];
            match s.read(&mut b) {
                Ok(0) => break t.elapsed(),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break t.elapsed(),
                Ok(_) => {}
            }
        };
        eprintln!("{addr}: a client trickling a byte every 0.5 s was closed after {closed:?}");
    }
}

fn demo_node(dir: &std::path::Path) -> NodeProc {
    let n = NodeProc::start(&dir.join("n"), "both", &[]).expect("node");
    n.add_demo_template();
    n.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    n
}

/// Item 11: the demo with a 70,000-character input (its bodies read
/// `$CARONI_ENV_*`) completes with the whole value, not `prepend append`.
#[test]
fn safety_11_the_demo_carries_a_70000_character_input_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = demo_node(dir.path());
    let input = format!("start_message={}", "r".repeat(70_000));
    let id = n.run("test_simple", &[&input]);
    let w = n.wait(&id, Duration::from_secs(60));
    assert_eq!(w["state"], "completed", "{}", w["message"]);
    let result = w["outputs"]["result"].as_str().expect("result");
    assert_eq!(result, format!("prepend{} append", "R".repeat(70_000)));
}

/// Item 13: escape sequences in inputs, outputs and a job's stderr reach
/// the terminal as visible escapes in `workflow show` and `workflow
/// list`; JSON output keeps them exact.
#[test]
fn safety_13_control_characters_never_reach_the_terminal_raw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = demo_node(dir.path());
    let evil = "\u{1b}]0;owned\u{7}\u{1b}[2Jtitle\u{9b}31m";
    let done = n.run("test_simple", &[&format!("start_message={evil}")]);
    assert_eq!(n.wait(&done, Duration::from_secs(60))["state"], "completed");
    n.put_job_type(
        dir.path(),
        "foojob2",
        &["final_text"],
        &["out"],
        r"printf '\033]52;c;b3duZWQ=\a\033[2J' >&2; exit 3",
        true,
    );
    let failed = n.run("test_simple", &[&format!("start_message={evil}")]);
    let w = n.wait(&failed, Duration::from_secs(60));
    assert_eq!(w["state"], "failed");
    // JSON: exact.
    assert!(w.to_string().contains(r"\u001b]0;owned\u0007"), "{w}");
    let expect = [
        (vec!["workflow", "show", done.as_str()], r"\x1b]0;OWNED\x07"),
        (vec!["workflow", "list"], r"\x1b]0;OWNED\x07"),
        (
            vec!["workflow", "show", failed.as_str()],
            r"\x1b]52;c;b3duZWQ=\x07",
        ),
    ];
    for (args, shown) in expect {
        let out = n.cli(&args).expect("cli");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.stdout.iter().any(|b| *b == 0x1b || *b == 0x07),
            "{args:?} printed a raw control character:\n{text}"
        );
        assert!(!text.contains('\u{9b}'), "{args:?}: raw CSI");
        assert!(
            text.contains(shown),
            "{args:?} does not show {shown}:\n{text}"
        );
    }
}

/// Item 14: the data directory is its owner's only (0700) and the
/// node's files 0600; an existing directory open to others is warned of.
#[test]
fn safety_14_the_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let n = demo_node(dir.path());
    let id = n.run("test_simple", &["start_message=private"]);
    assert_eq!(n.wait(&id, Duration::from_secs(60))["state"], "completed");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&n.data_dir), 0o700);
    let mut files = 0;
    let mut stack = vec![n.data_dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                assert_eq!(mode(&p) & 0o077, 0, "{} is {:o}", p.display(), mode(&p));
                stack.push(p);
            } else {
                files += 1;
                assert_eq!(mode(&p) & 0o077, 0, "{} is {:o}", p.display(), mode(&p));
            }
        }
    }
    assert!(files > 5, "only {files} files");
    // A directory opened to others by hand: the node says so at start.
    let wide = dir.path().join("wide");
    std::fs::create_dir(&wide).expect("mkdir");
    std::fs::set_permissions(&wide, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let w = NodeProc::start(&wide, "both", &[]).expect("node");
    assert!(
        w.log_text()
            .contains("the data directory is open to other users"),
        "{}",
        w.log_text()
    );
}

/// Item 8: 60 workflows with a 1 MiB input each, waiting for a job type
/// no agent has (their requests re-published every few seconds, an agent
/// declining): while they wait, the manager writes almost nothing (no
/// value is written again) and its memory does not grow.
#[test]
fn safety_08_waiting_workflows_with_large_inputs_cause_no_write_storm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent");
    m.add_demo_template();
    a.add_job_types(&["foojob1.yaml", "foojob2.yaml"]);
    let input = serde_json::json!({ "start_message": "w".repeat(1 << 20) });
    let started = Instant::now();
    let ids: Vec<String> = (0..60)
        .map(|_| m.console_run("test_simple", input.clone()))
        .collect();
    eprintln!("60 workflows of 1 MiB started in {:?}", started.elapsed());
    // Let the creation's writes settle, then watch the waiting.
    std::thread::sleep(Duration::from_secs(3));
    let written = |pid| caroni_tests::proc_field(pid, "io", "write_bytes:");
    let (w0, r0) = (written(m.pid()), rss_mb(m.pid()));
    std::thread::sleep(Duration::from_secs(15));
    let (w1, r1) = (written(m.pid()), rss_mb(m.pid()));
    let w = m.json(&["workflow", "show", &ids[0]]);
    let step1 = caroni_tests::step(&w, "step1");
    assert_eq!(step1["state"], "fulfilling", "{w:#}");
    assert!(
        w.to_string().contains("foojob0"),
        "the step waits for its job type: {w:#}"
    );
    let mb = (w1 - w0) as f64 / 1e6;
    let stats = http(&m.console_addr(), "GET", "/api/node", &[], "").expect("node");
    let stats: serde_json::Value = serde_json::from_str(&stats.body).expect("json");
    eprintln!(
        "15 s of waiting: {mb:.1} MB written; manager RSS {r0} MB -> {r1} MB; {} requests published so far",
        stats["stats"]["requests_published"]
    );
    assert!(mb < 30.0, "{mb:.1} MB written in 15 s of waiting");
    assert!(
        r1 <= r0 + 20,
        "RSS grew from {r0} MB to {r1} MB while waiting"
    );
}

/// Item 8, memory: workflows that wait for admission keep their large
/// values on disk only and read them back when admitted, across a restart
/// of the manager too: each completes with its own whole value.
#[test]
fn safety_08_workflows_waiting_for_admission_keep_their_values_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut n = NodeProc::start(&dir.path().join("n"), "both", &["--max-open-requests", "3"])
        .expect("node");
    n.add_demo_template();
    n.add_demo_job_types_with_slow_step2(dir.path(), 1);
    let value = |i: usize| format!("{i}-{}", "v".repeat(100_000));
    let start = |n: &NodeProc, i: usize| {
        n.console_run(
            "test_simple",
            serde_json::json!({ "start_message": value(i) }),
        )
    };
    let ids: Vec<String> = (0..4).map(|i| start(&n, i)).collect();
    // One runs, three wait; a restart reloads the waiting ones from disk.
    n.kill();
    n.spawn().expect("restart");
    for (i, id) in ids.iter().enumerate() {
        let w = n.wait(id, Duration::from_secs(120));
        assert_eq!(w["state"], "completed", "{}", w["message"]);
        let want = format!("prepend{} append", value(i).to_uppercase());
        assert!(
            w["outputs"]["result"] == want.as_str(),
            "workflow {i} lost or mixed up its value"
        );
    }
}
