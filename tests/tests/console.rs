//! The web console in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by `make setup`), driven over WebDriver with
//! fantoccini against real `caroni-node` processes: clicks and typing as a
//! person would. Each test saves a screenshot of the page it ends on under
//! `<target>/console-screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caroni_tests::{free_port, NodeProc};
use fantoccini::{Client, ClientBuilder, Locator};

const LIMIT: Duration = Duration::from_secs(60);

/// A chromedriver process and a browser session, ended on drop.
struct Browser {
    client: Option<Client>,
    driver: Child,
    rt: tokio::runtime::Runtime,
    name: &'static str,
}

impl Browser {
    fn start(name: &'static str) -> Self {
        Self::start_with(name, &[])
    }

    /// A browser with extra Chromium switches.
    fn start_with(name: &'static str, switches: &[&str]) -> Self {
        let driver_bin = caroni_tests::which("chromedriver").expect(
            "chromedriver is not on PATH; run `make setup` (apt: chromium chromium-driver)",
        );
        let port = free_port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let client = rt.block_on(async {
            let mut caps = serde_json::Map::new();
            let mut args = vec!["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,1100"];
            args.extend_from_slice(switches);
            caps.insert(
                "goog:chromeOptions".into(),
                serde_json::json!({
                    "binary": caroni_tests::which("chromium").map(|p| p.display().to_string()).unwrap_or_else(|| "/usr/bin/chromium".into()),
                    "args": args,
                }),
            );
            let start = Instant::now();
            loop {
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                match ClientBuilder::new(connector)
                    .capabilities(caps.clone())
                    .connect(&format!("http://127.0.0.1:{port}"))
                    .await
                {
                    Ok(c) => break c,
                    Err(e) => {
                        assert!(start.elapsed() < LIMIT, "no WebDriver session: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Self {
            client: Some(client),
            driver,
            rt,
            name,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("session")
    }

    fn goto(&self, url: &str) {
        self.rt.block_on(self.c().goto(url)).expect("goto");
    }

    /// Waits for the first element matching `css` (bounded).
    fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.rt
            .block_on(
                self.c()
                    .wait()
                    .at_most(LIMIT)
                    .for_element(Locator::Css(css)),
            )
            .unwrap_or_else(|e| panic!("no element {css}: {e}\npage: {}", self.text()))
    }

    /// Runs `act` on the element, finding it again when a live update
    /// replaced it in between (a stale element), as a person would.
    fn act(
        &self,
        css: &str,
        what: &str,
        act: impl Fn(&fantoccini::elements::Element) -> Result<(), fantoccini::error::CmdError>,
    ) {
        let mut tries = 0;
        loop {
            let e = self.find(css);
            match act(&e) {
                Ok(()) => return,
                Err(e) if e.is_stale_element_reference() && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("{what} {css}: {e}"),
            }
        }
    }

    fn click(&self, css: &str) {
        self.act(css, "click", |e| self.rt.block_on(e.click()));
    }

    fn type_into(&self, css: &str, text: &str) {
        self.act(css, "type into", |e| {
            self.rt.block_on(e.clear())?;
            self.rt.block_on(e.send_keys(text))
        });
    }

    fn text_of(&self, css: &str) -> String {
        let text = std::cell::RefCell::new(String::new());
        self.act(css, "read", |e| {
            *text.borrow_mut() = self.rt.block_on(e.text())?;
            Ok(())
        });
        text.into_inner()
    }

    /// The page's visible text.
    fn text(&self) -> String {
        self.rt
            .block_on(self.c().execute("return document.body.innerText", vec![]))
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    /// Number of elements matching `css` now.
    fn count(&self, css: &str) -> usize {
        self.rt
            .block_on(self.c().execute(
                "return document.querySelectorAll(arguments[0]).length",
                vec![serde_json::json!(css)],
            ))
            .ok()
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as usize
    }

    /// Polls until `pred` holds on the page (bounded), without reloading it.
    fn until(&self, what: &str, pred: impl Fn(&Self) -> bool) {
        let start = Instant::now();
        while !pred(self) {
            assert!(
                start.elapsed() < LIMIT,
                "timed out waiting for {what}; page:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn hash(&self) -> String {
        self.rt
            .block_on(self.c().current_url())
            .map(|u| u.fragment().unwrap_or_default().to_string())
            .unwrap_or_default()
    }

    /// Saves a screenshot of the page as it is now.
    fn screenshot(&self) -> PathBuf {
        let dir = caroni_tests::bin_dir()
            .parent()
            .map(|p| p.join("console-screenshots"))
            .unwrap_or_else(|| PathBuf::from("console-screenshots"));
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{}.png", self.name));
        let png = self.rt.block_on(self.c().screenshot()).expect("screenshot");
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), c.close()).await });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

const BROKEN_BODY: &str =
    "sleep 3\necho 'foojob2 is broken on purpose' >&2\necho 'this is not JSON'";

/// The original's failure drill, entirely in the browser: break `foojob2`
/// on the agent's console, start the demo on the manager's console, see
/// attempt 1 fail with its stderr, fix the body, see the workflow complete.
#[test]
fn the_failure_drill_in_the_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent");
    m.add_demo_template();
    a.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let b = Browser::start("failure_drill");

    // Agent console: break foojob2.
    b.goto(&format!("{}/#/jobtype/foojob2", a.console_url()));
    let original = b.text_of("#jt-body-view");
    assert!(original.contains("append"), "{original}");
    b.click("#edit");
    b.type_into("#jt-body", BROKEN_BODY);
    b.click("#save");
    b.find("#saved");
    assert!(b.text_of("#jt-body-view").contains("broken on purpose"));

    // Manager console: start the demo from the form.
    b.goto(&format!("{}/#/run?template=test_simple", m.console_url()));
    b.type_into("input[data-input=start_message]", "caronirocks");
    b.click("#run-submit");
    b.until("the workflow page", |b| b.hash().starts_with("/workflow/"));
    let workflow_url = format!("{}/#{}", m.console_url(), b.hash());
    // Attempt 1 of step3 fails, with its stderr, without reloading.
    b.find(".attempt-row[data-step=step3][data-attempt='1'][data-state=failed]");
    b.until("stderr of attempt 1", |b| {
        b.text().contains("foojob2 is broken on purpose")
    });
    assert!(
        b.text().contains("stdout is not a JSON object"),
        "{}",
        b.text()
    );

    // Agent console: fix the body.
    b.goto(&format!("{}/#/jobtype/foojob2", a.console_url()));
    b.click("#edit");
    b.type_into("#jt-body", &original);
    b.click("#save");
    b.find("#saved");

    // Manager console: the workflow completes with the demo's result.
    b.goto(&workflow_url);
    b.until("the workflow to complete", |b| {
        b.count("#wf-state [data-state=completed]") == 1
    });
    assert!(
        b.text_of("#outputs").contains("prependCARONIROCKS append"),
        "{}",
        b.text()
    );
    assert!(b.count(".attempt-row[data-step=step3]") >= 2);
    assert_eq!(b.count("#dag g.node.step[data-state=completed]"), 3);
    b.screenshot();
}

/// Two agents with complementary job types: the workflow page names both,
/// and its graph shows every step completed.
#[test]
fn two_agents_on_one_workflow_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent a");
    let c = NodeProc::agent_of(&m, &dir.path().join("c"), &[]).expect("agent c");
    m.add_demo_template();
    a.add_job_types(&["foojob0.yaml", "foojob1.yaml"]);
    c.add_job_types(&["foojob2.yaml"]);
    let (a_id, c_id) = (a.node_id(), c.node_id());
    let b = Browser::start("two_agents");

    b.goto(&format!("{}/#/run", m.console_url()));
    b.type_into("input[data-input=start_message]", "two agents");
    b.click("#run-submit");
    b.until("the workflow page", |b| b.hash().starts_with("/workflow/"));
    b.until("every step completed in the graph", |b| {
        b.count("#dag g.node.step[data-state=completed]") == 3
    });
    let attempts = b.text_of("#attempts");
    assert!(
        attempts.contains(&a_id) && attempts.contains(&c_id),
        "{attempts}"
    );
    assert!(b.text_of("#outputs").contains("prependTWO AGENTS append"));
    // Edges carry the dataflow's ports.
    assert!(b.count("#dag g.edge") >= 4, "{}", b.text());
    assert_eq!(b.count("#timeline g.bar[data-state=completed]"), 3);
    // An attempt's logs, read from the agent that ran it (step3 ran on c).
    b.click("button.logs[data-step=step3][data-attempt='1']");
    b.until("step3's stdout from agent c", |b| {
        b.count("tr.log-row[data-step=step3] pre.log[data-stream=stdout]") == 1
    });
    let logs = b.text_of("tr.log-row[data-step=step3]");
    assert!(
        logs.contains("prependTWO AGENTS append") && logs.contains(&c_id),
        "{logs}"
    );

    // The list, filtered by state, shows it; the agent's jobs name the workflow.
    let id = b.hash().trim_start_matches("/workflow/").to_string();
    b.goto(&format!("{}/#/workflows?state=completed", m.console_url()));
    b.find(&format!("tr.wf-row[data-id='{id}']"));
    b.goto(&format!("{}/#/jobs", c.console_url()));
    b.until("the agent's job", |b| b.text().contains(&id));
    // The ledger page: agent c issued one receipt, countersigned by m.
    b.goto(&format!("{}/#/ledger", c.console_url()));
    b.until("c's receipt countersigned", |b| {
        b.text().contains("1 (0 credits)") && b.text().contains("the chain holds")
    });
    let ledger = b.text_of("section.ledger[data-role=agent]");
    assert!(
        ledger.contains("the chain holds") && ledger.contains("countersigned"),
        "{ledger}"
    );
    b.find(&format!(
        "section.ledger[data-role=agent] tr[data-peer='{}']",
        m.node_id()
    ));
    b.goto(&format!("{}/#/workflow/{id}", m.console_url()));
    b.find("#dag g.node.step[data-state=completed]");
    b.screenshot();
}

/// With a token, the console asks for it once: a wrong one is refused with
/// a message, the right one opens the pages (the live stream included);
/// data endpoints refuse requests without it, and logging out ends it.
#[test]
fn a_token_protected_console_refuses_a_wrong_token_and_serves_the_right_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n =
        NodeProc::start(&dir.path().join("n"), "both", &["--api-token", "s3cret"]).expect("node");
    let b = Browser::start("token");

    b.goto(&format!("{}/api/workflows", n.console_url()));
    assert!(b.text().contains("log in first"), "{}", b.text());
    b.goto(&format!("{}/#/workflows", n.console_url()));
    b.find("#token");
    b.type_into("#token", "wrong");
    b.click("#login");
    assert!(b.text_of("#login-error").contains("not this node's token"));
    b.type_into("#token", "s3cret");
    b.click("#login");
    b.find("#workflows");
    b.find("#live.on");
    b.screenshot();
    b.click("#logout");
    b.find("#token");
    b.goto(&format!("{}/#/workflows", n.console_url()));
    b.find("#token");
}

/// A tiny web server on another port of the same host: it records the
/// head of every request and serves `page`. Stopped on drop.
struct OtherSite {
    addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtherSite {
    fn start(page: String) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("addr");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut buf = vec![0u8; 16384];
                        let n = c.read(&mut buf).unwrap_or(0);
                        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                        s2.lock().expect("seen").push(head);
                        let _ = write!(
                            c,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                            page.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for OtherSite {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Issue 19, item 1: after a login on the console at 127.0.0.1:P, a page
/// served from another port of the same host receives no usable
/// credential: the browser sends it no cookie, it cannot read the
/// session, and the console's API refuses what it can send.
#[test]
fn safety_01_a_console_login_gives_no_credential_to_another_port_of_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n =
        NodeProc::start(&dir.path().join("n"), "both", &["--api-token", "s3cret"]).expect("node");
    let page = format!(
        "<!doctype html><p id=r>waiting</p><script>
         const s = localStorage.getItem('caroni-session');
         fetch('{}/api/workflows', {{credentials: 'include'}})
           .then(r => 'status ' + r.status, () => 'blocked')
           .then(a => {{ document.getElementById('r').textContent = 'stored=' + s + ' api=' + a; }});
         </script>",
        n.console_url()
    );
    let other = OtherSite::start(page);
    let b = Browser::start("no_credential_elsewhere");

    b.goto(&format!("{}/#/workflows", n.console_url()));
    b.type_into("#token", "s3cret");
    b.click("#login");
    b.find("#workflows");
    b.find("#live.on");
    let cookies = b.rt.block_on(b.c().get_all_cookies()).expect("cookies");
    assert!(cookies.is_empty(), "the console set cookies: {cookies:?}");
    let session =
        b.rt.block_on(
            b.c()
                .execute("return localStorage.getItem('caroni-session')", vec![]),
        )
        .expect("script");
    let session = session
        .as_str()
        .expect("a session in localStorage")
        .to_string();
    assert!(session.len() >= 32, "{session}");

    // The other site: the browser sends it nothing of the console's.
    b.goto(&format!("http://{}/", other.addr));
    b.until("the other page's verdict", |b| b.text().contains("stored="));
    assert!(b.text().contains("stored=null"), "{}", b.text());
    let seen = other.seen();
    assert!(!seen.is_empty());
    for head in &seen {
        assert!(
            !head.contains(&session),
            "the session reached another port:\n{head}"
        );
        assert!(
            !head.to_ascii_lowercase().contains("\ncookie:"),
            "a cookie reached another port:\n{head}"
        );
    }
    // What another site could replay is refused; the session header is
    // the credential, and only the console's page holds it.
    let cookie = format!("caroni_session={session}");
    let replay = caroni_tests::http(
        &n.console_addr(),
        "GET",
        "/api/workflows",
        &[("cookie", &cookie)],
        "",
    )
    .expect("replay");
    assert_eq!(replay.status, 401, "{}", replay.body);
    let own = caroni_tests::http(
        &n.console_addr(),
        "GET",
        "/api/workflows",
        &[("x-caroni-session", &session)],
        "",
    )
    .expect("own");
    assert_eq!(own.status, 200, "{}", own.body);
    b.screenshot();
}

/// Issue 19, item 2: a page at a name that resolves to the console's
/// address (DNS rebinding, simulated with Chromium's resolver rules) is
/// refused, so its scripts cannot read or change anything; the console's
/// IP address keeps working, and a `--console-host` name is served.
#[test]
fn safety_02_a_rebound_host_name_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(
        &dir.path().join("n"),
        "both",
        &["--console-host", "caroni.test"],
    )
    .expect("node");
    n.add_demo_template();
    let b = Browser::start_with(
        "rebinding",
        &["--host-resolver-rules=MAP rebind.test 127.0.0.1, MAP caroni.test 127.0.0.1"],
    );
    let port = n.ports.console;
    b.goto(&format!("http://rebind.test:{port}/#/workflows"));
    b.until("the refusal", |b| {
        b.text().contains("does not serve the host")
    });
    assert!(
        b.text().contains(&format!("rebind.test:{port}")),
        "{}",
        b.text()
    );
    assert_eq!(b.count("#workflows"), 0);
    let api = caroni_tests::http(
        &n.console_addr(),
        "POST",
        "/api/workflows",
        &[
            ("host", &format!("rebind.test:{port}")),
            ("content-type", "application/json"),
            ("x-caroni-console", "1"),
        ],
        r#"{"template":"test_simple","inputs":{"start_message":"x"}}"#,
    )
    .expect("post");
    assert_eq!(api.status, 421, "{}", api.body);
    assert!(!n.ok(&["workflow", "list"]).contains("test_simple"));
    // The configured name and the address itself are served.
    b.goto(&format!("http://caroni.test:{port}/#/workflows"));
    b.find("#workflows");
    b.goto(&format!("{}/#/workflows", n.console_url()));
    b.find("#workflows");
    b.screenshot();
}

/// Unknown ids, invalid edits and oversized forms give a clear message and
/// change nothing; a lost live connection is shown and recovers by itself.
#[test]
fn bad_input_is_answered_clearly_and_the_live_connection_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    n.add_demo_template();
    n.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let b = Browser::start("bad_input");

    b.goto(&format!(
        "{}/#/workflow/0190f5c2-7d1e-7a8b-9c3d-2e4f5a6b7c8d",
        n.console_url()
    ));
    assert!(
        b.text_of("#page-error").contains("no workflow"),
        "{}",
        b.text()
    );
    b.goto(&format!("{}/#/workflow/not-an-id", n.console_url()));
    assert!(b.text_of("#page-error").contains("not a workflow id"));

    // An invalid edit: the message of the API, and nothing changes.
    b.goto(&format!("{}/#/jobtype/foojob1", n.console_url()));
    let before = b.text_of("#jt-body-view");
    b.click("#edit");
    b.type_into("#jt-outputs", "");
    b.type_into("#jt-body", "echo '{}'");
    b.click("#save");
    assert!(
        b.text_of("#save-error").contains("no outputs declared"),
        "{}",
        b.text()
    );
    // Leaving the form shows the job type as the agent has it: unchanged.
    b.click("#edit-cancel");
    assert_eq!(b.text_of("#jt-body-view"), before);

    // An oversized form is refused with its status; templates unchanged.
    let status = b
        .rt
        .block_on(b.c().execute_async(
            "const done = arguments[arguments.length - 1];
             fetch('/api/templates', {method: 'POST', headers: {'content-type': 'application/json', 'x-caroni-console': '1'},
               body: JSON.stringify({name: 'huge', cwl: 'x'.repeat(3 * 1024 * 1024)})})
               .then(r => done(r.status)).catch(e => done(String(e)));",
            vec![],
        ))
        .expect("fetch");
    assert_eq!(status, serde_json::json!(413));
    assert!(!n.ok(&["template", "list"]).contains("huge"));

    // The live connection: lost when the node stops, back when it returns.
    b.goto(&format!("{}/#/workflows", n.console_url()));
    b.find("#live.on");
    n.kill();
    b.find("#live.off");
    assert!(b.text().contains("reconnecting"), "{}", b.text());
    n.spawn().expect("restart");
    b.find("#live.on");
    let id = n.run("test_simple", &["start_message=back"]);
    b.find(&format!("tr.wf-row[data-id='{id}']"));
    b.screenshot();
}

/// Files in the console: a file chosen in the start form is uploaded and
/// passed; the workflow page shows the File output by name, size and hash,
/// and its download link (signed, no session needed) gives the bytes; a
/// link with a wrong signature is refused.
#[test]
fn files_are_uploaded_from_the_start_form_and_downloaded_from_the_workflow_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    n.ok(&[
        "template",
        "add",
        "files_chain",
        &caroni_tests::example("templates/files_chain.cwl"),
    ]);
    n.add_job_types(&["appendline.yaml"]);
    let file = dir.path().join("reads.txt");
    std::fs::write(&file, "hello files\n").expect("write");
    let b = Browser::start("files");

    b.goto(&format!("{}/#/run?template=files_chain", n.console_url()));
    b.act("input[data-file-for=reads]", "choose a file for", |e| {
        b.rt.block_on(e.send_keys(file.to_str().expect("utf8")))
    });
    b.click("#run-submit");
    b.until("the workflow page", |b| b.hash().starts_with("/workflow/"));
    b.until("the workflow to complete", |b| {
        b.count("#wf-state [data-state=completed]") == 1
    });
    let outputs = b.text_of("#outputs");
    assert!(
        outputs.contains("checked.txt (") && outputs.contains("sha256"),
        "{outputs}"
    );
    let inputs = b.text_of("#inputs");
    assert!(inputs.contains("reads.txt (12 B"), "{inputs}");

    // The page's download link: a signed URL, fetched as the browser would.
    let got = b
        .rt
        .block_on(b.c().execute_async(
            "const done = arguments[arguments.length - 1];
             const a = document.querySelector('#outputs a.download');
             api('/api/files/' + a.dataset.sha + '/link?name=' + encodeURIComponent(a.dataset.name), { method: 'POST', body: {} })
               .then(r => fetch(r.url, { credentials: 'omit' }))
               .then(x => x.text().then(t => done([x.status, x.headers.get('content-disposition'), t])))
               .catch(e => done(['error', String(e)]));",
            vec![],
        ))
        .expect("download");
    assert_eq!(got[0], 200, "{got}");
    assert!(
        got[1].as_str().unwrap_or_default().contains("checked.txt"),
        "{got}"
    );
    let text = got[2].as_str().unwrap_or_default().to_string();
    assert!(text.starts_with("hello files\n"), "{text:?}");
    assert_eq!(
        text.lines().count(),
        4,
        "the file and one line per step: {text:?}"
    );

    // A forged or expired link is refused.
    let sha =
        b.rt.block_on(b.c().execute(
            "return document.querySelector('#outputs a.download').dataset.sha",
            vec![],
        ))
        .expect("sha");
    let sha = sha.as_str().expect("sha");
    let far = caroni_types::now_ms() + 60_000;
    let forged = caroni_tests::http(
        &n.console_addr(),
        "GET",
        &format!("/files/{sha}?name=x&exp={far}&sig=00"),
        &[],
        "",
    )
    .expect("http");
    assert_eq!(forged.status, 403, "{forged:?}");
    b.screenshot();
}

/// Issue 24 in the browser: a branch no agent takes shows a banner with
/// the reason; a failed workflow is retried from its page; the start form
/// is typed (an enum is a choice, a default applies when left empty); the
/// list searches by id prefix and shows progress; a template is deleted.
#[test]
fn blocked_banner_retry_typed_form_search_and_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(
        &dir.path().join("m"),
        "both",
        &["--answer-timeout", "1s", "--unplaceable-timeout", "3s"],
    )
    .expect("node");
    m.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    // step2 names a job type nobody has: blocked, then failed.
    let text = std::fs::read_to_string(caroni_tests::example("templates/test_simple.cwl"))
        .expect("read")
        .replace("CaroniJobName: foojob1", "CaroniJobName: nosuchjob")
        .replace(
            "  start_message: string\n",
            "  start_message: string\n  speed:\n    type: {type: enum, symbols: [fast, slow]}\n    default: slow\n",
        );
    let t = dir.path().join("blocked.cwl");
    std::fs::write(&t, text).expect("write");
    m.ok(&["template", "add", "blocked", t.to_str().expect("utf8")]);
    let b = Browser::start("everyday");

    b.goto(&format!("{}/#/run?template=blocked", m.console_url()));
    // The enum is a choice with its default shown; left at default.
    b.find("select[data-input=speed]");
    assert!(b.text().contains("default slow"), "{}", b.text());
    b.type_into("input[data-input=start_message]", "hello");
    b.click("#run-submit");
    b.until("the workflow page", |b| b.hash().starts_with("/workflow/"));
    let id = b.hash().trim_start_matches("/workflow/").to_string();
    b.until("the blocked banner", |b| {
        b.count(".banner.blocked[data-step=step2]") == 1
    });
    assert!(
        b.text().contains("no job type named nosuchjob"),
        "{}",
        b.text()
    );
    b.until("the workflow to fail", |b| {
        b.count("#wf-state [data-state=failed]") == 1
    });
    let w = m.json(&["workflow", "show", &id]);
    assert_eq!(w["inputs"]["speed"], "slow", "the default applied: {w:#}");

    // Fix it (the job type now exists), then Retry from the page.
    m.put_job_type(
        dir.path(),
        "nosuchjob",
        &["text"],
        &["outSB"],
        r#"jq -cn --arg t "$CARONI_ENV_text" '{outSB: ("prepend" + $t)}'"#,
        false,
    );
    b.click("#retry");
    b.until("the workflow to complete after the retry", |b| {
        b.count("#wf-state [data-state=completed]") == 1
    });
    assert!(
        b.text_of("#outputs").contains("prependHELLO append"),
        "{}",
        b.text()
    );

    // The list: search by a prefix of the id; progress shown.
    b.goto(&format!("{}/#/workflows", m.console_url()));
    b.type_into("#f-id", &id[..13]);
    b.rt.block_on(async {
        let _ = b
            .c()
            .execute(
                "document.getElementById('f-id').dispatchEvent(new Event('change'))",
                vec![],
            )
            .await;
    });
    b.until("one match", |b| b.count("tr.wf-row") == 1);
    assert!(b.text().contains("3/3"), "{}", b.text());

    // Delete the template from its page.
    b.goto(&format!("{}/#/template/blocked", m.console_url()));
    b.rt.block_on(async {
        let _ = b.c().execute("window.confirm = () => true", vec![]).await;
    });
    b.click("#delete");
    b.until("the templates page", |b| b.hash().starts_with("/templates"));
    let left = m.json(&["template", "list"]);
    assert_eq!(left.as_array().map(Vec::len), Some(0), "{left:#}");
    b.screenshot();
}
