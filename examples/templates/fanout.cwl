# A dynamic workflow: a scatter, a condition and a sub-workflow, over the
# demo's job types (examples/jobtypes/foojob0..2.yaml).
#
#   caroni run fanout 'words=["caroni","rocks","far"]'
#
# `shout` upper-cases each word (one job per word, gathered in order);
# `maybe` runs only with also=true (skipped otherwise: its output is null);
# `frame` runs a two-step sub-workflow on the first word.
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#
requirements:
  ScatterFeatureRequirement: {}
  SubworkflowFeatureRequirement: {}
  StepInputExpressionRequirement: {}

inputs:
  words: string[]
  also:
    type: boolean
    default: "false"

outputs:
  loud:
    type: Any
    outputSource: shout/jobout
  extra:
    type: Any
    outputSource: maybe/jobout
  framed:
    type: Any
    outputSource: frame/out

steps:
  shout:
    run:
      class: CommandLineTool
      inputs:
        message: string
      outputs:
        jobout: string
    hints:
      caroni:CaroniRequirement:
        CaroniJobName: foojob0
    scatter: message
    in:
      message: words
    out: [jobout]

  maybe:
    run:
      class: CommandLineTool
      inputs:
        message: string
      outputs:
        jobout: string
    hints:
      caroni:CaroniRequirement:
        CaroniJobName: foojob0
    when: $(inputs.also)
    in:
      message:
        source: words
        valueFrom: $(self[0])
      also: also
    out: [jobout]

  frame:
    run:
      class: Workflow
      inputs:
        t: string
      outputs:
        out:
          type: string
          outputSource: close/out
      steps:
        open:
          run:
            class: CommandLineTool
            inputs:
              text: string
            outputs:
              outSB: string
          hints:
            caroni:CaroniRequirement:
              CaroniJobName: foojob1
          in:
            text: t
          out: [outSB]
        close:
          run:
            class: CommandLineTool
            inputs:
              final_text: string
            outputs:
              out: string
          hints:
            caroni:CaroniRequirement:
              CaroniJobName: foojob2
          in:
            final_text: open/outSB
          out: [out]
    in:
      t:
        source: shout/jobout
        valueFrom: $(self[0])
    out: [out]
