//! CommandLineTools and ExpressionTools run on this host, from documents
//! written the way CWL users write them.

use std::path::Path;

use caroni_cwl_exec::{expr::Limits, load, run, Job, Options, ToolError};
use serde_json::{json, Value};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_string_lossy().into_owned()
}

fn run_doc(dir: &Path, doc: &str, inputs: Value) -> Result<Value, ToolError> {
    let path = write(dir, "tool.cwl", doc);
    let loaded = load(&path).expect("load");
    let outdir = dir.join("out");
    let _ = std::fs::remove_dir_all(&outdir);
    let opts = Options {
        outdir,
        tmpdir: dir.join("tmp"),
        limits: Limits::default(),
        path_env: std::env::var("PATH").unwrap_or_default(),
        checksums: true,
        cancel: None,
        stderr_to: None,
        container: None,
    };
    run(
        &Job {
            process: &loaded.process,
            process_dir: &loaded.dir,
            inputs: &inputs,
            inputs_dir: dir,
        },
        &opts,
    )
}

#[test]
fn a_tool_reads_a_file_and_captures_stdout_with_a_checksum() {
    let dir = tempfile::tempdir().expect("tmp");
    write(dir.path(), "whale.txt", "call me ishmael\n");
    let out = run_doc(
        dir.path(),
        r#"
cwlVersion: v1.2
class: CommandLineTool
baseCommand: [wc, -c]
stdin: $(inputs.file.path)
inputs:
  file: File
outputs:
  count:
    type: stdout
stdout: count.txt
"#,
        json!({"file": {"class": "File", "location": "whale.txt"}}),
    )
    .expect("run");
    let f = &out["count"];
    assert_eq!(f["basename"], "count.txt");
    assert_eq!(
        std::fs::read_to_string(f["path"].as_str().expect("ok"))
            .expect("ok")
            .trim(),
        "16"
    );
    assert!(
        f["checksum"].as_str().expect("ok").starts_with("sha1$"),
        "{f}"
    );
    assert_eq!(f["size"], 3);
}

#[test]
fn globs_output_eval_and_javascript() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = run_doc(
        dir.path(),
        r#"
cwlVersion: v1.2
class: CommandLineTool
requirements:
  InlineJavascriptRequirement: {}
  ShellCommandRequirement: {}
inputs:
  n: int
arguments:
  - shellQuote: false
    valueFrom: "for i in $(Array.from({length: inputs.n}, (_, i) => i).join(' ')); do echo $i > f$i.txt; done"
outputs:
  files:
    type: File[]
    outputBinding:
      glob: "f*.txt"
  total:
    type: int
    outputBinding:
      glob: "f*.txt"
      loadContents: true
      outputEval: ${ var t = 0; for (var i = 0; i < self.length; i++) t += parseInt(self[i].contents); return t; }
"#,
        json!({"n": 4}),
    )
    .expect("run");
    assert_eq!(out["files"].as_array().expect("ok").len(), 4, "{out}");
    assert_eq!(out["files"][0]["basename"], "f0.txt");
    assert_eq!(out["total"], 6);
}

#[test]
fn initial_workdir_env_and_cwl_output_json() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = run_doc(
        dir.path(),
        r#"
cwlVersion: v1.2
class: CommandLineTool
requirements:
  InitialWorkDirRequirement:
    listing:
      - entryname: script.sh
        entry: |
          echo "{\"greeting\": \"$GREETING $(inputs.name)\"}" > cwl.output.json
  EnvVarRequirement:
    envDef:
      GREETING: hello
inputs:
  name: string
baseCommand: [sh, script.sh]
outputs:
  greeting: string
"#,
        json!({"name": "world"}),
    )
    .expect("run");
    assert_eq!(out["greeting"], "hello world");
}

#[test]
fn failures_say_why() {
    let dir = tempfile::tempdir().expect("tmp");
    let e = run_doc(
        dir.path(),
        "cwlVersion: v1.2\nclass: CommandLineTool\nbaseCommand: [sh, -c, 'exit 3']\ninputs: []\noutputs: []\npermanentFailCodes: [3]\n",
        json!({}),
    )
    .expect_err("fails");
    assert!(
        matches!(
            e,
            ToolError::Exit {
                code: 3,
                permanent: true
            }
        ),
        "{e}"
    );
    let e = run_doc(
        dir.path(),
        "cwlVersion: v1.2\nclass: CommandLineTool\nbaseCommand: [sleep, '5']\ninputs: []\noutputs: []\nrequirements:\n  ToolTimeLimit:\n    timelimit: 1\n",
        json!({}),
    )
    .expect_err("fails");
    assert!(matches!(e, ToolError::TimeLimit(1)), "{e}");
    let e = run_doc(
        dir.path(),
        "cwlVersion: v1.2\nclass: CommandLineTool\nbaseCommand: echo\ninputs:\n  x: int\noutputs: []\n",
        json!({}),
    )
    .expect_err("fails");
    assert!(e.to_string().contains("missing required input `x`"), "{e}");
    let e = run_doc(
        dir.path(),
        "cwlVersion: v1.2\nclass: CommandLineTool\nbaseCommand: echo\nrequirements:\n  MPIRequirement: {}\ninputs: []\noutputs: []\n",
        json!({}),
    )
    .expect_err("fails");
    assert!(matches!(e, ToolError::Unsupported(_)), "{e}");
}

#[test]
fn an_expression_tool_computes_its_outputs() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = run_doc(
        dir.path(),
        r#"
cwlVersion: v1.2
class: ExpressionTool
requirements:
  InlineJavascriptRequirement: {}
inputs:
  xs: int[]
outputs:
  sum: int
expression: "$({sum: inputs.xs.reduce(function (a, b) { return a + b; }, 0)})"
"#,
        json!({"xs": [1, 2, 3]}),
    )
    .expect("run");
    assert_eq!(out, json!({"sum": 6}));
}

#[test]
fn a_packed_document_runs_its_main_process() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = run_doc(
        dir.path(),
        r##"
cwlVersion: v1.2
$graph:
  - id: "#other"
    class: CommandLineTool
    baseCommand: "false"
    inputs: []
    outputs: []
  - id: "#main"
    class: CommandLineTool
    baseCommand: echo
    inputs:
      - id: "#main/word"
        type: string
        inputBinding: {}
    outputs:
      - id: "#main/out"
        type: stdout
"##,
        json!({"word": "packed"}),
    )
    .expect("run");
    let text = std::fs::read_to_string(out["out"]["path"].as_str().expect("ok")).expect("ok");
    assert_eq!(text, "packed\n");
}

#[test]
fn listings_load_as_deep_as_asked_and_secondary_files_follow_their_file() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(dir.path().join("top/mid/low")).expect("mkdir");
    write(dir.path(), "top/mid/low/leaf.txt", "leaf\n");
    write(dir.path(), "a.txt", "a\n");
    write(dir.path(), "a.txt.sec", "sec\n");
    // Shallow: the entries of the directory, not theirs.
    let out = run_doc(
        dir.path(),
        r#"
cwlVersion: v1.2
class: CommandLineTool
requirements:
  InlineJavascriptRequirement: {}
  LoadListingRequirement: {loadListing: shallow_listing}
inputs:
  d: Directory
outputs:
  seen:
    type: Any
    outputBinding:
      outputEval: $([inputs.d.listing.length, inputs.d.listing[0].listing === undefined])
baseCommand: "true"
"#,
        json!({"d": {"class": "Directory", "location": "top"}}),
    )
    .expect("run");
    assert_eq!(out["seen"], json!([1, true]), "{out:#}");
    // A File staged in a Directory literal brings its secondary files.
    let out = run_doc(
        dir.path(),
        r#"
cwlVersion: v1.2
class: CommandLineTool
requirements:
  InlineJavascriptRequirement: {}
  InitialWorkDirRequirement:
    listing:
      - entryname: staged
        entry: "${ return {class: 'Directory', listing: [inputs.f]}; }"
inputs:
  f: {type: File, secondaryFiles: [.sec]}
outputs:
  names:
    type: string[]
    outputBinding:
      glob: staged/*
      outputEval: $(self.map(function(x) { return x.basename; }))
baseCommand: "true"
"#,
        json!({"f": {"class": "File", "location": "a.txt"}}),
    )
    .expect("run");
    assert_eq!(out["names"], json!(["a.txt", "a.txt.sec"]), "{out:#}");
}
