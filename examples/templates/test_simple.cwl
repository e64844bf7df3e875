# The demonstration workflow: start_message → foojob0 → foojob1 → foojob2.
# With start_message=caronirocks the output `result` is
# "prependCARONIROCKS append".
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#

inputs:
  start_message: string

outputs:
  result:
    type: string
    outputSource: step3/out

steps:
  step1:
    run:
      class: CommandLineTool
      inputs:
        message: string
      outputs:
        jobout: string
    hints:
      caroni:CaroniRequirement:
        CaroniJobName: foojob0
    in:
      message: start_message
    out: [jobout]

  step2:
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
      text: step1/jobout
    out: [outSB]

  step3:
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
      final_text: step2/outSB
    out: [out]
