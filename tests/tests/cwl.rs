//! Real CWL CommandLineTools on the mesh, with real `caroni-node`
//! processes: `caroni cwl-runner` runs a tool on an agent that opted in
//! (`--cwl-tools local`), with a file going in and out through the data
//! plane; an agent that did not opt in declines with its reason.

use std::path::Path;
use std::time::Duration;

use caroni_tests::{run_bounded, step, NodeProc};

const WC_TOOL: &str = r#"
cwlVersion: v1.2
class: CommandLineTool
baseCommand: [wc, -l]
inputs:
  text:
    type: File
    inputBinding: {position: 1}
  label:
    type: string
    default: lines
outputs:
  counted:
    type: stdout
  label_back:
    type: string
    outputBinding:
      outputEval: $(inputs.label)
stdout: count.txt
"#;

/// `caroni cwl-runner --quiet --outdir OUTDIR ARGS…` against `node`.
fn cwl_runner(node: &NodeProc, outdir: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = node.cli_command();
    cmd.args(["cwl-runner", "--quiet", "--outdir"])
        .arg(outdir)
        .args(args);
    run_bounded(cmd, Duration::from_secs(120)).expect("cwl-runner")
}

/// [`cwl_runner`] that must succeed: its output object.
fn cwl_runner_ok(node: &NodeProc, outdir: &Path, args: &[&str]) -> serde_json::Value {
    let out = cwl_runner(node, outdir, args);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log_text()
    );
    serde_json::from_slice(&out.stdout).expect("the output object")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_string_lossy().into_owned()
}

#[test]
fn cwl_runner_runs_a_tool_on_an_agent_that_runs_cwl_tools() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let _agent = NodeProc::agent_of(&manager, &dir.path().join("a"), &["--cwl-tools", "local"])
        .expect("agent");
    let tool = write(dir.path(), "wc.cwl", WC_TOOL);
    write(dir.path(), "poem.txt", "one\ntwo\nthree\n");
    let job = write(
        dir.path(),
        "job.yml",
        "text: {class: File, location: poem.txt}\n",
    );
    let outdir = dir.path().join("out");
    let v = cwl_runner_ok(&manager, &outdir, &[&tool, &job]);
    assert_eq!(
        v["label_back"], "lines",
        "the tool's default applied: {v:#}"
    );
    let counted = &v["counted"];
    assert_eq!(counted["class"], "File");
    assert_eq!(counted["basename"], "count.txt");
    let path = counted["path"].as_str().expect("path");
    assert!(path.starts_with(&*outdir.to_string_lossy()), "{path}");
    let text = std::fs::read_to_string(path).expect("downloaded");
    assert!(text.starts_with("3 "), "{text:?}");
    assert!(
        counted["checksum"]
            .as_str()
            .unwrap_or("")
            .starts_with("sha1$"),
        "{counted}"
    );
}

#[test]
fn an_agent_that_does_not_run_cwl_tools_declines_with_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let _agent = NodeProc::agent_of(&manager, &dir.path().join("a"), &[]).expect("agent");
    echo_is_declined(
        &manager,
        dir.path(),
        "--cwl-tools off",
        "does not run CWL tools",
    );
}

/// Runs a workflow whose one step echoes a word with a tool that has no
/// DockerRequirement, and checks that the step shows the agent's decline
/// naming `flag` and saying `why`.
fn echo_is_declined(manager: &NodeProc, dir: &Path, flag: &str, why: &str) {
    let template = write(
        dir,
        "echo-wf.cwl",
        r#"
cwlVersion: v1.2
class: Workflow
inputs:
  word: string
outputs:
  said:
    type: File
    outputSource: echo/said
steps:
  echo:
    run:
      class: CommandLineTool
      baseCommand: echo
      inputs:
        word: {type: string, inputBinding: {}}
      outputs:
        said: stdout
    in: {word: word}
    out: [said]
"#,
    );
    manager.ok(&["template", "add", "echo_tool", &template]);
    let id = manager.run("echo_tool", &["word=hi"]);
    let w = manager.wait_until(&id, Duration::from_secs(60), "a decline", |w| {
        w.to_string().contains(flag)
    });
    let echo = step(&w, "echo").to_string();
    assert!(echo.contains(why), "{echo}");
    manager.ok(&["workflow", "cancel", &id]);
}

#[test]
fn a_template_with_a_real_tool_is_checked_when_added() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let template = write(
        dir.path(),
        "wf.cwl",
        r#"
cwlVersion: v1.2
class: Workflow
inputs:
  f: File
outputs: []
steps:
  echo:
    run:
      class: CommandLineTool
      baseCommand: echo
      inputs:
        word: {type: string, inputBinding: {}}
      outputs: []
    in: {word: f}
    out: []
"#,
    );
    let e = manager.fails(&["template", "add", "echo_tool", &template]);
    assert!(e.contains("carries File") && e.contains("string"), "{e}");
    // Given text where files must be references, the manager says so.
    let template = write(
        dir.path(),
        "ls.cwl",
        r#"
cwlVersion: v1.2
class: Workflow
inputs:
  d: Directory
outputs: []
steps:
  ls:
    run:
      class: CommandLineTool
      baseCommand: ls
      inputs:
        d: {type: Directory, inputBinding: {}}
      outputs: []
    in: {d: d}
    out: []
"#,
    );
    manager.ok(&["template", "add", "ls_tool", &template]);
    let e = manager.fails(&[
        "run",
        "ls_tool",
        r#"d={"class":"Directory","location":"file:///etc","basename":"etc"}"#,
    ]);
    assert!(e.contains("not an uploaded reference"), "{e}");
}

/// Step `pack` makes a Directory (with a subdirectory) and a File with a
/// secondary file from a record holding a File; step `look`, on whichever
/// agent takes it, reads them all back.
const PACK_TOOL: &str = r#"
cwlVersion: v1.2
class: CommandLineTool
requirements:
  ShellCommandRequirement: {}
  InlineJavascriptRequirement: {}
inputs:
  r:
    type:
      type: record
      fields:
        name: string
        seed: File
arguments:
  - shellQuote: false
    valueFrom: >-
      mkdir -p $(inputs.r.name)/sub &&
      cp $(inputs.r.seed.path) $(inputs.r.name)/seed.txt &&
      echo deep > $(inputs.r.name)/sub/deep.txt &&
      echo main > main.dat && echo index > main.dat.idx
outputs:
  tree:
    type: Directory
    outputBinding: {glob: $(inputs.r.name)}
  main:
    type: File
    secondaryFiles: [.idx]
    outputBinding: {glob: main.dat}
"#;

const LOOK_TOOL: &str = r#"
cwlVersion: v1.2
class: CommandLineTool
requirements:
  ShellCommandRequirement: {}
inputs:
  d: Directory
  m:
    type: File
    secondaryFiles: [.idx]
arguments:
  - shellQuote: false
    valueFrom: >-
      cd $(inputs.d.path) && find . -type f | sort && cat sub/deep.txt seed.txt &&
      cat $(inputs.m.path).idx
outputs:
  report: stdout
  same: {type: Directory, outputBinding: {outputEval: $(inputs.d)}}
stdout: report.txt
"#;

#[test]
fn directories_records_and_secondary_files_cross_the_mesh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let _a1 = NodeProc::agent_of(&manager, &dir.path().join("a1"), &["--cwl-tools", "local"])
        .expect("agent 1");
    let _a2 = NodeProc::agent_of(&manager, &dir.path().join("a2"), &["--cwl-tools", "local"])
        .expect("agent 2");
    write(dir.path(), "pack.cwl", PACK_TOOL);
    write(dir.path(), "look.cwl", LOOK_TOOL);
    let wf = write(
        dir.path(),
        "wf.cwl",
        r#"
cwlVersion: v1.2
class: Workflow
requirements:
  InlineJavascriptRequirement: {}
inputs:
  r:
    type:
      type: record
      fields:
        name: string
        seed: File
outputs:
  report: {type: File, outputSource: look/report}
  tree: {type: Directory, outputSource: pack/tree}
  again: {type: Directory, outputSource: look/same}
  main: {type: File, outputSource: pack/main}
steps:
  pack: {run: pack.cwl, in: {r: r}, out: [tree, main]}
  look: {run: look.cwl, in: {d: pack/tree, m: pack/main}, out: [report, same]}
"#,
    );
    write(dir.path(), "seed.in", "sown\n");
    let job = write(
        dir.path(),
        "job.yml",
        "r: {name: crop, seed: {class: File, location: seed.in}}\n",
    );
    let outdir = dir.path().join("out");
    let v = cwl_runner_ok(&manager, &outdir, &[&wf, &job]);
    let report =
        std::fs::read_to_string(v["report"]["path"].as_str().expect("path")).expect("report");
    assert_eq!(
        report, "./seed.txt\n./sub/deep.txt\ndeep\nsown\nindex\n",
        "{v:#}"
    );
    for out in ["tree", "again"] {
        let tree = &v[out];
        assert_eq!(tree["class"], "Directory", "{v:#}");
        assert_eq!(tree["basename"], "crop", "{v:#}");
        let at = Path::new(tree["path"].as_str().expect("path"));
        assert!(at.starts_with(&outdir), "{at:?}");
        let deep = std::fs::read_to_string(at.join("sub/deep.txt")).expect("deep file");
        assert_eq!(deep, "deep\n");
        let names: Vec<&str> = tree["listing"]
            .as_array()
            .expect("listing")
            .iter()
            .filter_map(|e| e["basename"].as_str())
            .collect();
        assert_eq!(names, ["seed.txt", "sub"], "{tree:#}");
    }
    let main = &v["main"];
    let idx = &main["secondaryFiles"][0];
    assert_eq!(idx["basename"], "main.dat.idx", "{main:#}");
    let idx_text =
        std::fs::read_to_string(idx["path"].as_str().expect("idx path")).expect("idx file");
    assert_eq!(idx_text, "index\n");
}

#[test]
fn cwl_runner_runs_a_workflow_of_tools_in_other_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let _a1 = NodeProc::agent_of(&manager, &dir.path().join("a1"), &["--cwl-tools", "local"])
        .expect("agent 1");
    let _a2 = NodeProc::agent_of(&manager, &dir.path().join("a2"), &["--cwl-tools", "local"])
        .expect("agent 2");
    write(
        dir.path(),
        "rev.cwl",
        "cwlVersion: v1.2\nclass: CommandLineTool\nbaseCommand: tac\ninputs:\n  f: {type: File, inputBinding: {}}\noutputs:\n  out: stdout\nstdout: rev.txt\n",
    );
    write(
        dir.path(),
        "sort.cwl",
        "cwlVersion: v1.2\nclass: CommandLineTool\nbaseCommand: sort\nrequirements:\n  InlineJavascriptRequirement: {}\ninputs:\n  f: {type: File, inputBinding: {position: 2}}\n  reverse: {type: boolean, inputBinding: {position: 1, prefix: -r}}\noutputs:\n  out: stdout\nstdout: $(inputs.f.nameroot + '.sorted')\n",
    );
    let wf = write(
        dir.path(),
        "wf.cwl",
        "cwlVersion: v1.2\nclass: Workflow\ninputs:\n  text: File\n  descending: boolean\noutputs:\n  result: {type: File, outputSource: sorted/out}\nsteps:\n  reversed:\n    run: rev.cwl\n    in: {f: text}\n    out: [out]\n  sorted:\n    run: sort.cwl\n    in: {f: reversed/out, reverse: descending}\n    out: [out]\n",
    );
    write(dir.path(), "words.txt", "abc\nxyz\nmno\n");
    let job = write(
        dir.path(),
        "job.json",
        r#"{"text": {"class": "File", "path": "words.txt"}, "descending": true}"#,
    );
    let outdir = dir.path().join("out");
    let v = cwl_runner_ok(&manager, &outdir, &[&wf, &job]);
    assert_eq!(v["result"]["basename"], "rev.sorted", "{v:#}");
    let text = std::fs::read_to_string(v["result"]["path"].as_str().expect("path")).expect("read");
    assert_eq!(text, "xyz\nmno\nabc\n");
    // The same document is a template: its tools are stored inline.
    manager.ok(&["template", "add", "rev_sort", &wf]);
    let shown = manager.ok(&["template", "show", "rev_sort"]);
    assert!(shown.contains("tac") && shown.contains("sort"), "{shown}");
    assert!(!shown.contains("rev.cwl"), "{shown}");
}

#[test]
fn cwl_runner_runs_an_expression_tool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let _agent = NodeProc::agent_of(&manager, &dir.path().join("a"), &["--cwl-tools", "local"])
        .expect("agent");
    let tool = write(
        dir.path(),
        "sum.cwl",
        "cwlVersion: v1.2\nclass: ExpressionTool\nrequirements:\n  InlineJavascriptRequirement: {}\ninputs:\n  xs: int[]\noutputs:\n  total: int\n  words: string[]\nexpression: |\n  ${ return {total: inputs.xs.reduce(function (a, b) { return a + b; }, 0), words: ['a b', 'c']}; }\n",
    );
    let job = write(dir.path(), "job.json", r#"{"xs": [1, 2, 39]}"#);
    let v = cwl_runner_ok(&manager, &dir.path().join("out"), &[&tool, &job]);
    assert_eq!(v, serde_json::json!({"total": 42, "words": ["a b", "c"]}));
}

#[test]
fn an_expression_that_never_ends_or_grows_without_bound_fails_its_job_and_the_agent_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let _agent = NodeProc::agent_of(
        &manager,
        &dir.path().join("a"),
        &[
            "--cwl-tools",
            "local",
            "--cwl-expression-timeout",
            "300ms",
            "--cwl-expression-memory-bytes",
            "16777216",
        ],
    )
    .expect("agent");
    let runner = |tool: &str| cwl_runner(&manager, &dir.path().join("out"), &[tool]);
    let forever = write(
        dir.path(),
        "forever.cwl",
        "cwlVersion: v1.2\nclass: CommandLineTool\nrequirements:\n  InlineJavascriptRequirement: {}\nbaseCommand: echo\narguments: ['${ while (true) {} }']\ninputs: []\noutputs: []\n",
    );
    let out = runner(&forever);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("ran longer than its limit of 300ms"),
        "{said}"
    );
    let greedy = write(
        dir.path(),
        "greedy.cwl",
        "cwlVersion: v1.2\nclass: CommandLineTool\nrequirements:\n  InlineJavascriptRequirement: {}\nbaseCommand: echo\narguments: [\"${ var a = []; while (true) a.push('xxxxxxxxxxxxxxxx' + a.length); }\"]\ninputs: []\noutputs: []\n",
    );
    let out = runner(&greedy);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("more than its limit of 16 MiB")
            || said.contains("ran longer than its limit"),
        "{said}"
    );
    // The agent still runs tools.
    let fine = write(
        dir.path(),
        "fine.cwl",
        "cwlVersion: v1.2\nclass: CommandLineTool\nrequirements:\n  InlineJavascriptRequirement: {}\nbaseCommand: echo\narguments: ['$(1 + 1)']\ninputs: []\noutputs:\n  out: stdout\n",
    );
    let out = runner(&fine);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// True when a Docker engine and the image `caroni-base:local` are here (make
/// test builds it); says why not otherwise.
fn docker_image_here(test: &str) -> bool {
    let ok = |args: &[&str]| {
        let mut cmd = std::process::Command::new("docker");
        cmd.args(args);
        run_bounded(cmd, Duration::from_secs(60)).is_ok_and(|o| o.status.success())
    };
    if !ok(&["info"]) {
        eprintln!("SKIPPED {test}: no Docker engine is reachable");
        return false;
    }
    if !ok(&["image", "inspect", "caroni-base:local"]) {
        eprintln!("SKIPPED {test}: image caroni-base:local is missing; deploy/build-image.sh builds it (make test does)");
        return false;
    }
    true
}

#[test]
fn an_agent_in_container_mode_runs_tools_in_their_image_and_declines_the_rest() {
    if !docker_image_here(
        "an_agent_in_container_mode_runs_tools_in_their_image_and_declines_the_rest",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let _agent = NodeProc::agent_of(
        &manager,
        &dir.path().join("a"),
        &["--cwl-tools", "container"],
    )
    .expect("agent");
    let tool = write(
        dir.path(),
        "inside.cwl",
        r#"
cwlVersion: v1.2
class: CommandLineTool
requirements:
  DockerRequirement: {dockerPull: "caroni-base:local"}
  ShellCommandRequirement: {}
inputs:
  text: File
arguments:
  - shellQuote: false
    valueFrom: >-
      if test -f /.dockerenv; then echo in-a-container; fi;
      wc -l < $(inputs.text.path)
outputs:
  said: stdout
stdout: said.txt
"#,
    );
    write(dir.path(), "poem.txt", "one\ntwo\nthree\n");
    let job = write(
        dir.path(),
        "job.yml",
        "text: {class: File, location: poem.txt}\n",
    );
    let outdir = dir.path().join("out");
    let v = cwl_runner_ok(&manager, &outdir, &[&tool, &job]);
    let said = std::fs::read_to_string(v["said"]["path"].as_str().expect("path")).expect("read");
    assert_eq!(said, "in-a-container\n3\n");
    // A tool without a DockerRequirement is declined with the reason.
    echo_is_declined(
        &manager,
        dir.path(),
        "--cwl-tools container",
        "only CWL tools with a DockerRequirement",
    );
}
