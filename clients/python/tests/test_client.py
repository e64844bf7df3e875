"""The Python client against real caroni-node processes."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from caroni_client import (
    AlreadyExists,
    CaroniError,
    Client,
    InvalidArgument,
    JobType,
    NotFound,
    Unauthenticated,
    Unavailable,
    Workflow,
    files_of,
)

from conftest import Node

SLOW_CWL = """
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#
inputs:
  seconds: string
outputs:
  done:
    type: string
    outputSource: nap/done
steps:
  nap:
    run:
      class: CommandLineTool
      inputs:
        seconds: string
      outputs:
        done: string
    hints:
      caroni:CaroniRequirement:
        CaroniJobName: py_sleeper
    in:
      seconds: seconds
    out: [done]
"""


#: Sleeps for its input `seconds`, then outputs done=yes.
SLEEPER = JobType(
    name="py_sleeper",
    inputs=["seconds"],
    outputs=["done"],
    body='sleep "$CARONI_ENV_seconds"; echo \'{"done": "yes"}\'',
    timeout_seconds=120,
)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def test_the_demo_runs_and_watch_follows_it_to_completion(client: Client, demo_cwl: str):
    t = client.put_template("py_demo", demo_cwl)
    assert t.inputs == ["start_message"]
    assert [s.job_type for s in t.steps] == ["foojob0", "foojob1", "foojob2"]

    wid = client.run("py_demo", {"start_message": "caronirocks"})
    seen = list(client.watch(wid, timeout=60))

    assert all(isinstance(w, Workflow) and w.id == wid for w in seen)
    assert seen[-1].state == "completed", seen[-1]
    assert seen[-1].outputs == {"result": "prependCARONIROCKS append"}
    # The iterator reported the way there, not only the end.
    assert len(seen) >= 2
    assert seen[0].state != "completed" or len(seen) == 1
    # Each step completed once, and the values flowed along the edges.
    final = client.show(wid)
    assert [(s.id, s.state) for s in final.steps] == [
        ("step1", "completed"),
        ("step2", "completed"),
        ("step3", "completed"),
    ]
    assert final.step("step1").attempt_history[0].state == "completed"
    assert {d.source: d.value for d in final.dataflows}["start_message"] == "caronirocks"
    assert final.finished_at is not None and final.finished_at >= final.created_at
    assert wid in [w.id for w in client.list_workflows(limit=10)]


def test_run_with_wait_returns_the_ended_workflow(client: Client, demo_cwl: str):
    client.put_template("py_demo", demo_cwl)
    w = client.run("py_demo", {"start_message": "from python"}, wait=True, timeout=60)
    assert w.state == "completed"
    assert w.outputs["result"] == "prependFROM PYTHON append"


def test_cancel_stops_a_slow_workflow_and_kills_its_job(node: Node, client: Client):
    client.put_job_type(
        SLEEPER,
        replace=SLEEPER.name in [j.name for j in client.job_types()],
    )
    client.put_template("py_slow", SLOW_CWL)
    wid = client.run("py_slow", {"seconds": "60"})

    running = None
    for w in client.watch(wid, timeout=30):
        if w.step("nap").state == "running":
            running = w
            break
    assert running is not None, "the slow step never started"

    started = time.monotonic()
    cancelled = client.cancel(wid)
    assert cancelled.state == "cancelled"
    assert client.show(wid).state == "cancelled"
    # The job on the agent ends, cancelled (not failed), long before its
    # 60 s sleep would; the cancelled step says so too.
    job_id = running.step("nap").job_id
    deadline = time.monotonic() + 10
    while client.job(job_id).state not in ("cancelled", "failed", "completed"):
        assert time.monotonic() < deadline, f"job {job_id} still {client.job(job_id).state}"
        time.sleep(0.1)
    job = client.job(job_id)
    assert job.state == "cancelled", job
    assert client.show(wid).step("nap").state == "cancelled"
    assert job.workflow_id == wid
    assert time.monotonic() - started < 10


def test_a_refused_template_raises_with_the_nodes_message(client: Client):
    with pytest.raises(InvalidArgument) as e:
        client.put_template("py_broken", "cwlVersion: v1.2\nclass: Workflow\nsteps: 7\n")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps" in e.value.message, e.value.message
    assert "PutTemplate" in str(e.value)
    # Nothing was registered.
    with pytest.raises(NotFound):
        client.template("py_broken")


def test_unknown_things_and_bad_inputs_raise_typed_errors(client: Client, demo_cwl: str):
    with pytest.raises(NotFound) as e:
        client.run("py_no_such_template", {})
    assert "py_no_such_template" in e.value.message
    client.put_template("py_demo", demo_cwl)
    with pytest.raises(InvalidArgument) as e:
        client.run("py_demo", {"wrong": "x"})
    assert "start_message" in e.value.message, e.value.message
    with pytest.raises(CaroniError) as e:
        client.show("not-a-uuid")
    assert e.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    with pytest.raises(NotFound):
        client.show(str(uuid.uuid4()))
    with pytest.raises(NotFound):
        list(client.watch(str(uuid.uuid4()), timeout=10))


def test_job_types_are_managed_through_the_client(client: Client):
    name = unique("py_type")
    jt = JobType(name=name, inputs=["a"], outputs=["b"], body="echo '{\"b\": 1}'")
    made = client.put_job_type(jt)
    # The agent fills in its defaults (300 s, 1 MiB) and the time.
    assert (made.name, made.inputs, made.outputs, made.body) == (name, ["a"], ["b"], jt.body)
    assert (made.timeout_seconds, made.max_output_bytes) == (300, 1024 * 1024)
    assert made.updated_at is not None
    assert client.job_type(name) == made
    with pytest.raises(AlreadyExists):
        client.put_job_type(jt)
    changed = client.put_job_type(
        JobType(name=name, inputs=["a"], outputs=["b"], body="true", timeout_seconds=5),
        replace=True,
    )
    assert client.job_type(name).body == "true" == changed.body
    assert client.job_type(name).timeout_seconds == 5
    assert name in [t.name for t in client.job_types()]
    with pytest.raises(InvalidArgument) as e:
        client.put_job_type(JobType(name="9 bad", inputs=[], outputs=[], body="true"))
    assert "name" in e.value.message
    client.delete_job_type(name)
    with pytest.raises(NotFound):
        client.job_type(name)


def test_templates_are_listed_and_deleted(client: Client, demo_cwl: str):
    name = unique("py_tpl")
    client.put_template(name, demo_cwl)
    assert name in [t.name for t in client.templates()]
    assert "CaroniJobName: foojob0" in client.template(name).cwl
    client.delete_template(name)
    with pytest.raises(NotFound):
        client.delete_template(name)


def test_node_info_names_its_roles(client: Client):
    info = client.node_info()
    assert sorted(info.roles) == ["agent", "manager"]
    assert info.node_id.startswith("12D3")
    assert client.stats()["workflows_live"] >= 0


def test_a_token_protected_node_wants_the_token(tmp_path):
    n = Node(tmp_path / "tok", "manager", ["--api-token", "py-s3cret"])
    try:
        with Client(n.url) as anonymous, pytest.raises(Unauthenticated) as e:
            anonymous.templates()
        assert e.value.message, "the node says why"
        with Client(n.url, token="wrong") as wrong, pytest.raises(Unauthenticated):
            wrong.templates()
        with Client(n.url, token="py-s3cret") as c:
            assert c.templates() == []
    finally:
        n.kill()


def test_an_unreachable_node_raises_unavailable():
    with Client(f"127.0.0.1:{_closed_port()}", timeout=3) as c, pytest.raises(Unavailable):
        c.node_info()


def test_a_bad_url_is_refused_with_the_forms_it_takes():
    with pytest.raises(ValueError) as e:
        Client("ftp://example")
    assert "http://host:port" in str(e.value)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_watch_goes_on_across_a_node_restart(tmp_path):
    n = Node(tmp_path / "restart", "both")
    try:
        c = n.client
        c.put_job_type(SLEEPER)
        c.put_template("py_slow", SLOW_CWL)
        wid = c.run("py_slow", {"seconds": "2"})
        states = []
        for w in c.watch(wid, timeout=90):
            states.append(w.state)
            if len(states) == 1:
                n.restart()  # SIGKILL under the open stream
        assert states[-1] == "completed", states
        assert c.show(wid).outputs == {"done": "yes"}
    finally:
        n.kill()


FILES_CWL = """
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#
inputs:
  data: File
outputs:
  copy:
    type: File
    outputSource: twice/out
steps:
  twice:
    run:
      class: CommandLineTool
      inputs:
        data: File
      outputs:
        out: File
    hints:
      caroni:CaroniRequirement:
        CaroniJobName: py_twice
    in:
      data: data
    out: [out]
"""

#: Writes its File input twice into one File output.
TWICE = JobType(
    name="py_twice",
    inputs=["data"],
    outputs=["out"],
    body='cat "$CARONI_FILE_data" "$CARONI_FILE_data" > twice.bin; echo \'{"out": {"class": "File", "path": "twice.bin"}}\'',
    timeout_seconds=120,
)


def test_files_are_uploaded_from_paths_and_downloaded_to_paths(client: Client, tmp_path):
    client.put_job_type(TWICE, replace=TWICE.name in [j.name for j in client.job_types()])
    client.put_template("py_files", FILES_CWL)
    data = bytes(range(256)) * 4096 + b"end"
    src = tmp_path / "input.bin"
    src.write_bytes(data)
    w = client.run("py_files", {"data": src}, wait=True, timeout=60)
    assert w.state == "completed", w
    (ref,) = files_of(w.outputs["copy"])
    assert ref.basename == "twice.bin" and ref.size == 2 * len(data)
    out = client.download(w.id, tmp_path / "copy.bin")
    assert out.read_bytes() == data + data
    assert not (tmp_path / "copy.bin.part").exists()
    # A reference already uploaded is passed as it is; text is refused.
    again = client.upload(src)
    assert again.size == len(data)
    w2 = client.run("py_files", {"data": again}, wait=True, timeout=60)
    assert w2.state == "completed"
    with pytest.raises(InvalidArgument, match="declared `File`"):
        client.run("py_files", {"data": "not a file"})


def test_docker_and_slurm_job_types_survive_put_of_get(client: Client):
    import json

    from caroni_client import DockerExecutor, Price, SlurmExecutor

    for jt in (
        JobType(
            name=unique("py_priced"),
            inputs=["a"],
            outputs=["b"],
            body="echo '{\"b\": 1}'",
            executor="bash",
            price=Price(fixed=0.5, per_second=0.01),
        ),
        JobType(
            name=unique("py_docker"),
            inputs=["a"],
            outputs=["b"],
            body="echo '{\"b\": 1}'",
            executor="docker",
            docker=DockerExecutor(image="caroni:local", cpus=1.5, memory="256m", env=["HOME"]),
        ),
        JobType(
            name=unique("py_slurm"),
            inputs=["a"],
            outputs=["b"],
            body="echo '{\"b\": 1}'",
            executor="slurm",
            slurm=SlurmExecutor(partition="debug", time_limit="00:05:00", cpus=2, sbatch=["--exclusive"]),
        ),
    ):
        made = client.put_job_type(jt)
        got = client.job_type(jt.name)
        assert got.executor == jt.executor and got.docker == made.docker and got.slurm == made.slurm
        assert got.price == jt.price
        again = client.put_job_type(got, replace=True)
        assert again == got, "a round trip changes nothing"
        assert client.job_type(jt.name).executor == jt.executor
        # Results serialise.
        assert json.loads(json.dumps(got.to_dict()))["name"] == jt.name
        client.delete_job_type(jt.name)


def test_a_submission_id_makes_one_workflow_and_retry_rerun_delete_work(
    client: Client, demo_cwl: str
):
    import json

    name = unique("py_idem")
    client.put_template(name, demo_cwl)
    rid = str(uuid.uuid4())
    first = client.run(name, {"start_message": "once"}, request_id=rid)
    assert client.run(name, {"start_message": "once"}, request_id=rid) == first
    done = client.run(name, {"start_message": "again"}, wait=True, timeout=60)
    assert done.state == "completed"
    assert json.loads(json.dumps(done.to_dict()))["state"] == "completed"
    other = client.rerun_workflow(done.id, {"start_message": "changed"})
    assert other != done.id
    with pytest.raises(CaroniError):
        client.retry_workflow(done.id)  # completed: nothing to resume
    last = None
    for last in client.watch(other, timeout=60):
        pass
    assert last is not None and last.state == "completed"
    assert last.inputs["start_message"] == "changed"
    assert client.delete_workflow(done.id) == 1
    with pytest.raises(NotFound):
        client.show(done.id)


def test_the_asyncio_client_runs_and_watches_many_in_one_loop(node: Node, demo_cwl: str):
    import asyncio

    from caroni_client.aio import Client as AsyncClient

    async def main():
        async with AsyncClient(node.url) as c:
            name = unique("py_aio")
            await c.put_template(name, demo_cwl)
            ids = await asyncio.gather(
                *(c.run(name, {"start_message": f"m{i}"}) for i in range(5))
            )
            ended = set()
            async for change in c.watch_all(timeout=60):
                if change.workflow_id in ids and change.ended:
                    assert change.state == "completed"
                    ended.add(change.workflow_id)
                    if ended == set(ids):
                        break
            last = None
            async for w in c.watch(ids[0], timeout=30):
                last = w
            assert last is not None and last.ended
            listed = [w.id async for w in c.iter_workflows(template=name, page=2)]
            assert sorted(listed) == sorted(ids), "every page, newest first"
            return ids

    ids = asyncio.run(main())
    assert len(ids) == 5


#: Writes `seconds` numbered lines to stderr, then its answer.
CHATTY = JobType(
    name="py_chatty",
    inputs=["seconds"],
    outputs=["done"],
    body='for i in $(seq 1 "$CARONI_ENV_seconds"); do echo "line $i of the log" >&2; done; '
    'echo \'{"done": "yes"}\'',
    timeout_seconds=60,
)


def test_an_attempts_whole_logs_are_read_from_its_agent(client: Client):
    client.put_job_type(CHATTY, replace=CHATTY.name in [j.name for j in client.job_types()])
    client.put_template("py_chatty", SLOW_CWL.replace("py_sleeper", "py_chatty"))
    w = client.run("py_chatty", {"seconds": "5000"}, wait=True, timeout=60)
    assert w.state == "completed", w
    out, err = client.log_text(w.id)
    # Every line, not only the 2 KiB tail the attempt carries.
    lines = err.splitlines()
    assert len(lines) == 5000 and lines[0] == "line 1 of the log", lines[:3]
    assert lines[-1] == "line 5000 of the log"
    assert len(client.show(w.id).step("nap").attempt_history[-1].stderr_tail) <= 2048
    assert out == '{"done": "yes"}\n'
    # Pieces say where they belong.
    chunks = list(client.logs(w.id, step="nap", attempt=1, stream="stderr", timeout=30))
    assert chunks and all(c.stream == "stderr" and c.step == "nap" and c.attempt == 1 for c in chunks)
    assert chunks[0].offset == 0 and chunks[0].to_dict()["data"].startswith("line 1")
    with pytest.raises(NotFound):
        list(client.logs(w.id, step="nosuchstep", timeout=30))
