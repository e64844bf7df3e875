# A diamond: split has two outputs, two branches run in parallel on them,
# join combines the branches, finalize wraps the result. Written in the list
# forms of CWL (inputs, outputs, steps, in, out) on purpose.
#
# With text=hello the output `final` is "[HELLO+olleh]".
cwlVersion: v1.2
class: Workflow

inputs:
  - id: text
    type: string

outputs:
  - id: final
    type: string
    outputSource: finalize/wrapped

steps:
  - id: split
    requirements:
      - class: CaroniRequirement
        CaroniJobName: split
    run:
      class: CommandLineTool
      inputs:
        - id: text
          type: string
      outputs:
        - id: left
          type: string
        - id: right
          type: string
    in:
      - id: text
        source: text
    out: [left, right]

  - id: upper
    hints:
      - class: caroni:CaroniRequirement
        CaroniJobName: upper
    run:
      class: CommandLineTool
      inputs: {value: string}
      outputs: {upper: string}
    in:
      - id: value
        source: split/left
    out:
      - id: upper

  - id: reverse
    hints:
      - class: caroni:CaroniRequirement
        CaroniJobName: reverse
    run:
      class: CommandLineTool
      inputs: {value: string}
      outputs: {reversed: string}
    in:
      value: {source: split/right}
    out: [reversed]

  - id: join
    hints:
      - class: caroni:CaroniRequirement
        CaroniJobName: join
        CaroniJobKVs: {separator: "+"}
    run:
      class: CommandLineTool
      inputs: {a: string, b: string}
      outputs: {joined: string}
    in:
      a: upper/upper
      b: reverse/reversed
    out: [joined]

  - id: finalize
    hints:
      - class: caroni:CaroniRequirement
        CaroniJobName: finalize
    run:
      class: CommandLineTool
      inputs: {joined: string}
      outputs: {wrapped: string}
    in:
      joined: join/joined
    out: [wrapped]
