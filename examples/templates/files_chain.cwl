# Files through three steps: the input file is passed by reference (its
# SHA-256), each step appends a line to a copy and declares the copy as a
# File output; the last copy is the workflow's output. Run it with
#   caroni run files_chain reads=@path/to/file
# and fetch the result with `caroni workflow download ID`.
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#

inputs:
  reads: File

outputs:
  checked:
    type: File
    outputSource: step3/out

steps:
  step1:
    run:
      class: CommandLineTool
      inputs:
        data: File
      outputs:
        out: File
    hints:
      caroni:CaroniRequirement:
        CaroniJobName: appendline
    in:
      data: reads
    out: [out]

  step2:
    run:
      class: CommandLineTool
      inputs:
        data: File
      outputs:
        out: File
    hints:
      caroni:CaroniRequirement:
        CaroniJobName: appendline
    in:
      data: step1/out
    out: [out]

  step3:
    run:
      class: CommandLineTool
      inputs:
        data: File
      outputs:
        out: File
    hints:
      caroni:CaroniRequirement:
        CaroniJobName: appendline
    in:
      data: step2/out
    out: [out]
