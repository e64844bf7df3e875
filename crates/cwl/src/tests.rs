use super::*;

const SIMPLE: &str = include_str!("../../../examples/templates/test_simple.cwl");
const DIAMOND: &str = include_str!("../../../examples/templates/diamond.cwl");

fn err(doc: &str) -> String {
    parse(doc)
        .expect_err("document must be refused")
        .to_string()
}

/// A one-step workflow in map form with `extra` spliced into the step.
fn one_step(extra: &str) -> String {
    format!(
        "class: Workflow
inputs: {{x: string}}
outputs: {{y: {{type: string, outputSource: s1/o}}}}
steps:
  s1:
    hints: {{CaroniRequirement: {{CaroniJobName: j}}}}
    in: {{i: x}}
    out: [o]
{extra}"
    )
}

#[test]
fn accepts_the_demo_template() {
    let wf = parse(SIMPLE).expect("test_simple parses");
    let ids: Vec<_> = wf.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["step1", "step2", "step3"]);
    let jobs: Vec<_> = wf.steps.iter().map(|s| s.job_type.as_str()).collect();
    assert_eq!(jobs, ["foojob0", "foojob1", "foojob2"]);
    assert_eq!(wf.inputs[0].id, "start_message");
    assert_eq!(wf.steps[1].inputs[0].name, "text");
    assert_eq!(
        wf.steps[1].inputs[0].source,
        Some(Source::StepOutput {
            step: "step1".into(),
            output: "jobout".into()
        })
    );
    assert_eq!(wf.outputs[0].source.to_string(), "step3/out");
}

#[test]
fn accepts_the_diamond_in_list_form() {
    let wf = parse(DIAMOND).expect("diamond parses");
    let pos = |id: &str| wf.steps.iter().position(|s| s.id == id).expect("step");
    assert!(pos("split") < pos("upper") && pos("split") < pos("reverse"));
    assert!(pos("upper") < pos("join") && pos("reverse") < pos("join"));
    assert!(pos("join") < pos("finalize"));
    let split = &wf.steps[pos("split")];
    assert_eq!(split.outputs, ["left", "right"]);
    assert_eq!(
        wf.steps[pos("join")]
            .job_kvs
            .get("separator")
            .map(String::as_str),
        Some("+")
    );
    // `requirements` without prefix and `hints` with `caroni:` both work.
    assert_eq!(split.job_type, "split");
    assert_eq!(wf.steps[pos("upper")].job_type, "upper");
}

#[test]
fn source_with_default_and_scalars_as_strings() {
    let wf = parse(
        "class: Workflow
inputs: {n: {type: int, default: 3}}
outputs: {y: {outputSource: s/o}}
steps:
  s:
    requirements: [{class: caroni:CaroniRequirement, CaroniJobName: j}]
    in:
      a: {source: n, default: 7}
      b: {default: true}
    out: [o]",
    )
    .expect("parses");
    assert_eq!(wf.inputs[0].default.as_deref(), Some("3"));
    assert_eq!(wf.steps[0].inputs[0].default.as_deref(), Some("7"));
    assert_eq!(wf.steps[0].inputs[1].source, None);
    assert_eq!(wf.steps[0].inputs[1].default.as_deref(), Some("true"));
}

#[test]
fn refuses_a_cycle() {
    let e = err("class: Workflow
inputs: {x: string}
outputs: {y: {outputSource: a/o}}
steps:
  a: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: b/o}, out: [o]}
  b: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: a/o}, out: [o]}");
    assert!(
        e.contains("cycle") && e.contains('a') && e.contains('b'),
        "{e}"
    );
}

#[test]
fn refuses_an_unknown_source() {
    let e = err("class: Workflow
inputs: {x: string}
outputs: {y: {outputSource: s1/o}}
steps:
  s1: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: nowhere}, out: [o]}");
    assert!(
        e.contains("steps.s1.in.i") && e.contains("unknown source `nowhere`"),
        "{e}"
    );
    let e = err("class: Workflow
inputs: {x: string}
outputs: {y: {outputSource: s1/missing}}
steps:
  s1: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: x}, out: [o]}");
    assert!(
        e.contains("outputs.y.outputSource") && e.contains("no output `missing`"),
        "{e}"
    );
}

#[test]
fn refuses_a_step_without_job_name() {
    let e = err("class: Workflow
inputs: {x: string}
outputs: {y: {outputSource: s1/o}}
steps:
  s1: {in: {i: x}, out: [o]}");
    assert!(
        e.contains("steps.s1") && e.contains("names no job type"),
        "{e}"
    );
}

#[test]
fn scatter_makes_a_dynamic_step_and_its_errors_say_where() {
    let wf = parse(&one_step("    scatter: i\n")).expect("scatter parses");
    let d = wf.steps[0].dynamic.as_ref().expect("a dynamic step");
    assert_eq!(d.scatter, vec!["i".to_string()]);
    assert_eq!(d.body.steps.len(), 1, "each element runs the step's job");
    let e = err(&one_step("    scatter: nope\n"));
    assert!(
        e.contains("steps.s1.scatter") && e.contains("`nope` is not an input"),
        "{e}"
    );
    let e = err(&one_step("    scatter: i\n    scatterMethod: diagonal\n"));
    assert!(
        e.contains("steps.s1.scatterMethod") && e.contains("diagonal"),
        "{e}"
    );
}

#[test]
fn a_condition_makes_a_dynamic_step() {
    let wf = parse(&one_step("    when: $(inputs.i == 'a')\n")).expect("when parses");
    let d = wf.steps[0].dynamic.as_ref().expect("a dynamic step");
    assert_eq!(d.when.as_deref(), Some("$(inputs.i == 'a')"));
    assert!(d.scatter.is_empty());
}

#[test]
fn every_cwl_type_is_read_by_what_it_carries() {
    let wf = parse(
        "class: Workflow
inputs:
  dir: Directory
  maybe_dir: Directory?
  rec: {type: {type: record, fields: {a: File, b: int}}}
  nested: {type: {type: array, items: {type: array, items: File}}}
  anything: Any
  ints: int[]
  pick: {type: {type: enum, symbols: [x, y]}}
  either: [string, int]
  indexed: {type: File, secondaryFiles: [.bai]}
outputs: {y: {outputSource: s1/o}}
steps:
  s1:
    hints: {CaroniRequirement: {CaroniJobName: j}}
    in: {a: dir, b: maybe_dir, c: rec, d: nested, e: anything, f: ints, g: pick, h: either, i: indexed}
    out: [o]",
    )
    .expect("parses");
    let kinds: Vec<Kind> = wf.inputs.iter().map(|i| i.kind).collect();
    use Kind::{Data, Value};
    assert_eq!(
        kinds,
        [Data, Data, Data, Data, Data, Value, Value, Value, Data]
    );
    let e = err("class: Workflow
inputs: {x: Fiel}
outputs: {y: {outputSource: s1/o}}
steps:
  s1: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: x}, out: [o]}");
    assert!(e.contains("inputs.x.type") && e.contains("`Fiel`"), "{e}");
    // A job type stages plain File references only.
    let e = err("class: Workflow
inputs: {x: Directory}
outputs: {y: {outputSource: s1/o}}
steps:
  s1:
    hints: {CaroniRequirement: {CaroniJobName: j}}
    run: {class: Operation, inputs: {i: File}, outputs: {o: string}}
    in: {i: x}
    out: [o]");
    assert!(e.contains("steps.s1.in.i"), "{e}");
}

const FILES: &str = include_str!("../../../examples/templates/files_chain.cwl");

#[test]
fn file_ports_carry_their_kind_along_the_dataflows() {
    let wf = parse(FILES).expect("files_chain parses");
    assert_eq!(wf.inputs[0].kind, Kind::File);
    assert!(wf.steps.iter().all(|s| s.inputs[0].kind == Kind::File));
    assert!(wf
        .steps
        .iter()
        .all(|s| s.output_kinds.get("out") == Some(&Kind::File)));
    assert_eq!(wf.outputs[0].kind, Kind::File);
    // `File[]`, optional files and arrays of File are read too; an
    // undeclared step input takes its source's kind.
    let wf = parse(
        "class: Workflow
inputs: {a: 'File[]', b: 'File?', c: {type: array, items: File}, d: string}
outputs: {y: {outputSource: s1/o}}
steps:
  s1: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: a, k: b, l: c, m: d}, out: [o]}",
    )
    .expect("parses");
    let kinds: Vec<Kind> = wf.steps[0].inputs.iter().map(|i| i.kind).collect();
    assert_eq!(kinds, [Kind::Files, Kind::File, Kind::Files, Kind::Value]);
}

#[test]
fn a_file_fed_to_a_string_port_is_refused_where_it_is() {
    let e = err("class: Workflow
inputs: {x: File}
outputs: {y: {outputSource: s1/o}}
steps:
  s1:
    run: {class: CommandLineTool, inputs: {i: string}, outputs: {o: string}}
    hints: {CaroniRequirement: {CaroniJobName: j}}
    in: {i: x}
    out: [o]");
    assert!(
        e.contains("steps.s1.in.i") && e.contains("carries File") && e.contains("declared string"),
        "{e}"
    );
    let e = err("class: Workflow
inputs: {x: string}
outputs: {y: {type: File, outputSource: s1/o}}
steps:
  s1: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: x}, out: [o]}");
    assert!(
        e.contains("outputs.y") && e.contains("declared File"),
        "{e}"
    );
    let e = err("class: Workflow
inputs: {x: {type: File, default: a.txt}}
outputs: {y: {outputSource: s1/o}}
steps:
  s1: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: x}, out: [o]}");
    assert!(
        e.contains("inputs.x.default") && e.contains("default File"),
        "{e}"
    );
}

#[test]
fn a_sub_workflow_is_parsed_whole_and_its_errors_say_where() {
    let e = err(&one_step(
        "    run: {class: Workflow, inputs: {}, outputs: {}, steps: {}}\n",
    ));
    assert!(
        e.contains("steps.s1.run.steps") && e.contains("empty"),
        "{e}"
    );
    let wf = parse(&one_step(
        "    run: {class: Workflow, inputs: {i: string}, outputs: {o: {type: string, outputSource: inner/o}}, steps: {inner: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {a: i}, out: [o]}}}\n",
    ))
    .expect("a sub-workflow parses");
    let d = wf.steps[0].dynamic.as_ref().expect("a dynamic step");
    assert!(d.subworkflow);
    assert_eq!(d.body.steps[0].id, "inner");
    assert_eq!(
        wf.steps[0].job_type, "",
        "a sub-workflow step names no job type"
    );
}

#[test]
fn refuses_duplicate_ids() {
    let e = err("class: Workflow
inputs: [{id: x, type: string}]
outputs: [{id: y, outputSource: s1/o}]
steps:
  - {id: s1, hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: x}, out: [o]}
  - {id: s1, hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: x}, out: [o]}");
    assert!(e.contains("duplicate id `s1`"), "{e}");
    // An input and a step sharing an id is a duplicate too.
    let e = err("class: Workflow
inputs: {s1: string}
outputs: {y: {outputSource: s1/o}}
steps:
  s1: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: s1}, out: [o]}");
    assert!(e.contains("duplicate id `s1`"), "{e}");
}

#[test]
fn refuses_an_output_without_source() {
    let e = err("class: Workflow
inputs: {x: string}
outputs: {y: {type: string}}
steps:
  s1: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: x}, out: [o]}");
    assert!(
        e.contains("outputs.y") && e.contains("no `outputSource`"),
        "{e}"
    );
}

#[test]
fn step_expressions_and_several_sources_make_a_dynamic_step() {
    let e = err(&one_step("    run: tool.cwl\n"));
    assert!(e.contains("external tool reference"), "{e}");
    let wf = parse(
        "class: Workflow
inputs: {x: string, z: string}
outputs: {y: {outputSource: [s1/o, x], pickValue: first_non_null}}
steps:
  s1:
    hints: {CaroniRequirement: {CaroniJobName: j}}
    in: {i: {source: [x, z], linkMerge: merge_flattened, valueFrom: '$(self[0])'}}
    out: [o]",
    )
    .expect("parses");
    let i = &wf.steps[0].inputs[0];
    assert_eq!(i.all_sources().len(), 2);
    assert_eq!(i.link_merge, Some(LinkMerge::Flattened));
    assert_eq!(i.value_from.as_deref(), Some("$(self[0])"));
    assert!(wf.steps[0].dynamic.is_some());
    assert_eq!(wf.outputs[0].pick_value, Some(PickValue::FirstNonNull));
    assert_eq!(wf.outputs[0].all_sources().len(), 2);
    let e = err("class: Workflow
inputs: {x: string}
outputs: {y: {outputSource: s1/o}}
steps:
  s1:
    hints: {CaroniRequirement: {CaroniJobName: j}}
    in: {i: {source: x, linkMerge: merge_sideways}}
    out: [o]");
    assert!(e.contains("steps.s1.in.i.linkMerge"), "{e}");
}

#[test]
fn refuses_a_tool_input_left_unbound() {
    let e = err("class: Workflow
inputs: {x: string}
outputs: {y: {outputSource: s1/o}}
steps:
  s1:
    hints: {CaroniRequirement: {CaroniJobName: j}}
    run: {class: CommandLineTool, inputs: {a: string, b: string}, outputs: {o: string}}
    in: {a: x}
    out: [o]");
    assert!(
        e.contains("input `b`") && e.contains("no source and no default"),
        "{e}"
    );
}

#[test]
fn syntax_errors_give_the_line() {
    let e = err("class: Workflow\nsteps: [\n  - a: b\n");
    assert!(e.contains("not valid YAML") && e.contains("line"), "{e}");
}

#[test]
fn max_attempts_hint() {
    let doc = format!(
        "hints: {{caroni:CaroniRequirement: {{CaroniMaxAttempts: 2}}}}\n{}",
        one_step("")
    );
    assert_eq!(parse(&doc).expect("parses").max_attempts, Some(2));
}

/// Deep nesting is refused before parsing (200 KB of `[` took 44 s to
/// parse), and the demo templates are far below the bound.
#[test]
fn deep_nesting_is_refused_before_parsing() {
    let deep = "[".repeat(200_000);
    let e = parse(&deep).expect_err("deep");
    assert!(e.to_string().contains("nest deeper"), "{e}");
    let quoted = format!("class: Workflow\nlabel: \"{}\"\n", "[".repeat(1000));
    assert!(
        !parse(&quoted)
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default()
            .contains("nest deeper"),
        "brackets inside a string are text"
    );
    for text in [SIMPLE, DIAMOND] {
        assert!(nesting(text) <= MAX_NESTING / 2, "{}", nesting(text));
        parse(text).expect("the examples parse");
    }
}

/// The nesting bound holds whatever comes before the brackets: a quote or
/// `#` inside a plain scalar, a quote after `:`, a line break YAML knows
/// but `str::lines` does not, a tag (the probe's bypasses took 40–45 s of
/// CPU for 200 KB); each is refused before the parser runs.
#[test]
fn safety_07_the_nesting_bound_holds_for_every_input() {
    let deep = "[".repeat(100_000);
    for prefix in [
        "[a'",
        "[a\"",
        "[a#",
        "x: [a'",
        "{k:'",
        "[k:\"",
        "[# c\u{2028}",
        "# c\r[",
        "[!<x>",
        "[!t ",
        "- [a'b ",
        "[\"x\":'",
        "|\n",
        "a: |x\n",
        "['a'''",
        "[\"a\\\\\"",
    ] {
        let text = format!("{prefix}{deep}");
        let start = std::time::Instant::now();
        let e = parse(&text).expect_err(prefix);
        assert!(e.to_string().contains("nest deeper"), "{prefix:?}: {e}");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{prefix:?} took {:?}",
            start.elapsed()
        );
    }
    // Text that only looks deep is not refused for it.
    for text in [
        "class: Workflow\nlabel: \"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"\n".to_string(),
        format!(
            "class: Workflow\ndoc: |\n  {}\n  {}\n",
            "[".repeat(40),
            "{".repeat(40)
        ),
        format!("class: Workflow\n# {}\n", "[".repeat(40)),
        format!("class: Workflow\nlabel: a[{}\n", "[".repeat(40)),
    ] {
        assert!(nesting(&text) < MAX_NESTING, "{text:?}: {}", nesting(&text));
    }
}

/// Whatever the text, the parser never sees collections nested deeper
/// than the pre-check counted (2,000 cases; `make fuzz` runs 100,000).
#[test]
fn safety_07_the_nesting_count_never_underestimates_the_parser_never_panic() {
    use proptest::prelude::*;
    fn depth(v: &serde_yaml_ng::Value) -> usize {
        use serde_yaml_ng::Value as V;
        match v {
            V::Sequence(s) => 1 + s.iter().map(depth).max().unwrap_or(0),
            V::Mapping(m) => {
                1 + m
                    .iter()
                    .map(|(k, v)| depth(k).max(depth(v)))
                    .max()
                    .unwrap_or(0)
            }
            V::Tagged(t) => depth(&t.value),
            _ => 0,
        }
    }
    let cases = std::env::var("CARONI_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let piece = prop_oneof![
        Just("["),
        Just("]"),
        Just("{"),
        Just("}"),
        Just(","),
        Just(": "),
        Just(":"),
        Just("'"),
        Just("\""),
        Just("#"),
        Just(" "),
        Just("\n"),
        Just("\n  "),
        Just("a"),
        Just("- "),
        Just("? "),
        Just("|"),
        Just(">"),
        Just("!t "),
        Just("!<[]> "),
        Just("\\"),
        Just("\t"),
        Just("\u{2028}"),
        Just("&a "),
        Just("*a"),
        Just("''"),
    ];
    let parsed = std::cell::Cell::new(0u32);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(piece, 0..40), |pieces| {
            let text: String = pieces.concat();
            if let Ok(v) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text) {
                parsed.set(parsed.get() + 1);
                let (real, counted) = (depth(&v), nesting(&text));
                prop_assert!(
                    real <= counted + 2,
                    "{text:?}: parser {real}, counted {counted}"
                );
            }
            Ok(())
        })
        .expect("the count bounds the parser's depth");
    eprintln!("{cases} texts, {} of them YAML", parsed.get());
}

#[test]
fn a_real_command_line_tool_becomes_a_request_that_carries_it() {
    let wf = parse(
        r#"
class: Workflow
inputs:
  reads: File
  n: int
outputs:
  counted: {type: File, outputSource: count/out}
steps:
  count:
    run:
      class: CommandLineTool
      requirements:
        InlineJavascriptRequirement: {}
      baseCommand: [head, -n]
      inputs:
        lines: {type: int, inputBinding: {position: 1}}
        in-file: {type: File, inputBinding: {position: 2}}
        label: {type: string?}
      outputs:
        out: stdout
    in: {lines: n, in-file: reads}
    out: [out]
"#,
    )
    .expect("a real tool step parses");
    let s = &wf.steps[0];
    assert_eq!(s.job_type, caroni_types::CWL_TOOL_JOB_TYPE);
    let tool: serde_json::Value =
        serde_json::from_str(&s.job_kvs[caroni_types::CWL_TOOL_KV]).expect("the tool as JSON");
    assert_eq!(tool["baseCommand"], serde_json::json!(["head", "-n"]));
    assert_eq!(
        tool["inputs"][0]["id"], "in-file",
        "normalised to a list: {tool}"
    );
    let kinds: BTreeMap<&str, Kind> = s.inputs.iter().map(|i| (i.name.as_str(), i.kind)).collect();
    assert_eq!(kinds["in-file"], Kind::File);
    assert_eq!(kinds["lines"], Kind::Value);
    // An input left unbound travels as null: the tool decides.
    let label = s.inputs.iter().find(|i| i.name == "label").expect("label");
    assert_eq!(label.default.as_deref(), Some("null"));
    assert_eq!(s.output_kinds.get("out"), Some(&Kind::File));
    // Files and text do not mix.
    let e = err(
        "class: Workflow\ninputs: {d: File}\noutputs: []\nsteps:\n  s:\n    run:\n      class: CommandLineTool\n      baseCommand: ls\n      inputs: {d: int}\n      outputs: []\n    in: {d: d}\n    out: []\n",
    );
    assert!(e.contains("carries File"), "{e}");
}

#[test]
fn a_real_tool_step_keeps_its_port_types_to_read_values_by() {
    let wf = parse(
        r#"class: Workflow
requirements: {ScatterFeatureRequirement: {}}
inputs: {xs: {type: Any}}
outputs: {y: {type: Any, outputSource: s1/out1}}
steps:
  s1:
    run:
      class: CommandLineTool
      inputs: [{id: in1, type: int}]
      baseCommand: [echo]
      outputs: [{id: out1, type: string, outputBinding: {outputEval: $(inputs.in1)}}]
    scatter: in1
    in: {in1: xs}
    out: [out1]"#,
    )
    .expect("parses");
    let s = &wf.steps[0];
    assert_eq!(
        s.output_types.get("out1").map(String::as_str),
        Some("\"string\"")
    );
    let d = s.dynamic.as_ref().expect("dynamic");
    assert_eq!(
        d.input_types.get("in1").map(String::as_str),
        Some("\"int\"")
    );
}

#[test]
fn retry_policy_is_read_per_step_over_the_workflow() {
    let doc = "class: Workflow
hints: {CaroniRequirement: {CaroniMaxAttempts: 4, CaroniRetryBackoff: 2s, CaroniNoRetry: [output]}}
inputs: {x: string}
outputs: {y: {type: string, outputSource: b/o}}
steps:
  a:
    hints: {CaroniRequirement: {CaroniJobName: j, CaroniMaxAttempts: 1, CaroniRetryBackoff: {initial: 500ms, max: 1m}}}
    in: {i: x}
    out: [o]
  b:
    hints: {CaroniRequirement: {CaroniJobName: j, CaroniNoRetry: []}}
    in: {i: a/o}
    out: [o]
";
    let wf = parse(doc).expect("parses");
    let a = &wf.steps[0].retry;
    assert_eq!(a.max_attempts, Some(1));
    assert_eq!(a.backoff_initial_ms, Some(500));
    assert_eq!(a.backoff_max_ms, Some(60_000));
    assert_eq!(a.no_retry, Some(vec!["output".to_string()]));
    let b = &wf.steps[1].retry;
    assert_eq!(b.max_attempts, Some(4), "the workflow's limit");
    assert_eq!(b.backoff_initial_ms, Some(2_000));
    assert_eq!(b.no_retry, Some(vec![]), "the step's own list wins");
    // Policies survive a stored plan only through `policies()`.
    let mut stored = wf.clone();
    for s in &mut stored.steps {
        s.retry = Retry::default();
    }
    stored.set_policies(&wf.policies());
    assert_eq!(stored.steps[0].retry, wf.steps[0].retry);
}

#[test]
fn unknown_caroni_keys_and_bad_policies_are_refused_where_they_are() {
    let e = err(&one_step("").replace("CaroniJobName: j", "CaroniJobName: j, CaroniJobKV: {a: b}"));
    assert!(
        e.contains("steps.s1.hints.CaroniRequirement.CaroniJobKV"),
        "{e}"
    );
    assert!(
        e.contains("unknown key `CaroniJobKV`") && e.contains("CaroniJobKVs"),
        "{e}"
    );
    let e = err(&format!(
        "hints: {{CaroniRequirement: {{CaroniJobName: j}}}}\n{}",
        one_step("")
    ));
    assert!(e.contains("belongs on a step"), "{e}");
    let e = err(&one_step("").replace(
        "CaroniJobName: j",
        "CaroniJobName: j, CaroniNoRetry: [flaky]",
    ));
    assert!(
        e.contains("CaroniNoRetry[0]") && e.contains("exit_status"),
        "{e}"
    );
    let e = err(&one_step("").replace(
        "CaroniJobName: j",
        "CaroniJobName: j, CaroniRetryBackoff: soon",
    ));
    assert!(
        e.contains("CaroniRetryBackoff") && e.contains("duration"),
        "{e}"
    );
}

#[test]
fn given_values_are_checked_against_declared_types() {
    assert!(check_input("\"int\"", "42").is_ok());
    let e = check_input("\"int\"", "notanumber").expect_err("not an int");
    assert!(e.contains("whole number"), "{e}");
    assert!(check_input("\"int?\"", "null").is_ok());
    assert!(check_input("[\"null\",\"float\"]", "2.5").is_ok());
    assert!(check_input("\"boolean\"", "yes").is_err());
    assert!(check_input("\"string\"", "anything").is_ok());
    let en = r##"{"type":"enum","symbols":["#x/fast","#x/slow"]}"##;
    assert!(check_input(en, "fast").is_ok());
    assert!(check_input(en, "medium")
        .expect_err("enum")
        .contains("fast, slow"));
    assert!(check_input("\"int[]\"", "[1, 2]").is_ok());
    let e = check_input("\"int[]\"", "[1, \"x\"]").expect_err("item");
    assert!(e.contains("item 1"), "{e}");
    let wf = parse(&one_step("").replace("inputs: {x: string}", "inputs: {x: string, n: int}"))
        .expect("parses");
    assert_eq!(wf.inputs[1].cwl_type.as_deref(), Some("\"int\""));
}

#[test]
fn needs_are_read_from_the_step_its_tool_and_the_workflow() {
    let doc = "class: Workflow
hints: {CaroniRequirement: {CaroniLabels: {region: eu}, CaroniMaxPrice: 2}}
inputs: {x: string}
outputs: {y: {type: string, outputSource: b/o}}
steps:
  a:
    run:
      class: CommandLineTool
      inputs: {i: string}
      outputs: {o: string}
      requirements: {ResourceRequirement: {coresMin: 2, ramMin: 1024, outdirMin: 100, tmpdirMin: 50}}
    hints: {CaroniRequirement: {CaroniJobName: j, CaroniCpus: 1.5, CaroniGpus: 1, CaroniLabels: {gpu: a100}}}
    in: {i: x}
    out: [o]
  b:
    hints: {CaroniRequirement: {CaroniJobName: j, CaroniMemory: 2g, CaroniMaxPrice: 0.25}}
    in: {i: a/o}
    out: [o]
";
    let wf = parse(doc).expect("parses");
    let a = &wf.steps[0].needs;
    assert_eq!(
        a.resources.cpu_milli, 1500,
        "the step's key over the tool's"
    );
    assert_eq!(
        a.resources.memory_mib, 1024,
        "the tool's ResourceRequirement"
    );
    assert_eq!(a.resources.disk_mib, 150, "outdirMin + tmpdirMin");
    assert_eq!(a.resources.gpus, 1);
    assert_eq!(a.labels.get("region").map(String::as_str), Some("eu"));
    assert_eq!(a.labels.get("gpu").map(String::as_str), Some("a100"));
    assert_eq!(a.max_price_milli, Some(2000), "the workflow's maximum");
    let b = &wf.steps[1].needs;
    assert_eq!(b.resources.memory_mib, 2048);
    assert_eq!(b.max_price_milli, Some(250));
    // Needs survive a stored plan only through `all_needs()`.
    let mut stored = wf.clone();
    for s in &mut stored.steps {
        s.needs = Default::default();
    }
    stored.set_needs(&wf.all_needs());
    assert_eq!(stored.steps[0].needs, wf.steps[0].needs);
    // A bad value is refused with its place.
    let bad = doc.replace("CaroniCpus: 1.5", "CaroniCpus: many");
    let e = parse(&bad).expect_err("bad cpus").to_string();
    assert!(
        e.contains("steps.a.hints.CaroniRequirement.CaroniCpus"),
        "{e}"
    );
}
