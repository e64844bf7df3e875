"""Plain, typed views of the node's messages (the generated protobuf classes
stay available through ``caroni_client.pb``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from ._generated.caroni.v1 import agent_pb2, manager_pb2, node_pb2, protocol_pb2

#: Workflow states after which nothing changes any more.
TERMINAL_STATES = frozenset({"completed", "failed", "cancelled"})


def _time(msg, name: str) -> Optional[datetime]:
    if not msg.HasField(name):
        return None
    ts = getattr(msg, name)
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=timezone.utc)


def _opt(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def _plain(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class _ToDict:
    def to_dict(self) -> Dict[str, Any]:
        """This value as plain data (times as ISO 8601 text), ready for
        ``json.dumps``."""
        return _plain(self)


@dataclass(frozen=True)
class Attempt(_ToDict):
    """One attempt at a step: the job an agent ran."""

    job_id: str
    agent: str
    state: str
    exit_status: Optional[int]
    message: str
    stderr_tail: str
    #: When its process started (the agent's clock); None until it ran.
    started_at: Optional[datetime]
    ended_at: Optional[datetime]
    superseded: bool
    #: When the job was placed on the agent, and when it had every input.
    placed_at: Optional[datetime] = None
    queued_at: Optional[datetime] = None
    #: Kind of failure (exit_status, output, timeout, killed, lost, ...).
    failure: str = ""

    @classmethod
    def from_pb(cls, m: manager_pb2.Attempt) -> "Attempt":
        return cls(
            job_id=m.job_id,
            agent=m.agent,
            state=m.state,
            exit_status=_opt(m, "exit_status"),
            message=m.message,
            stderr_tail=m.stderr_tail,
            started_at=_time(m, "started_at"),
            ended_at=_time(m, "ended_at"),
            superseded=m.superseded,
            placed_at=_time(m, "placed_at"),
            queued_at=_time(m, "queued_at"),
            failure=m.failure,
        )


@dataclass(frozen=True)
class Decline(_ToDict):
    """An agent's refusal of a step's job request, with its reason."""

    agent: str
    reason: str


@dataclass(frozen=True)
class Elements(_ToDict):
    """A dynamic step's elements (scatter, condition, sub-workflow), by state."""

    total: int
    waiting: int
    live: int
    completed: int
    skipped: int
    failed: int
    scatter: bool


@dataclass(frozen=True)
class ElementChild(_ToDict):
    """The child workflow that runs one element of a dynamic step."""

    index: int
    workflow_id: str
    state: str


@dataclass(frozen=True)
class Step(_ToDict):
    """One step of a workflow."""

    id: str
    job_type: str
    state: str
    attempts: int
    job_id: str
    agent: str
    request_id: str
    request_state: str
    attempt_history: List[Attempt]
    declines: List[Decline]
    elements: Optional[Elements] = None
    children: List[ElementChild] = field(default_factory=list)
    subworkflow: bool = False
    #: Why no agent can take its request (every known agent declined, or
    #: none answered in time); empty otherwise.
    blocked: str = ""
    blocked_since: Optional[datetime] = None
    #: When a ``retrying`` step asks for a job again.
    retry_at: Optional[datetime] = None

    @classmethod
    def from_pb(cls, m: manager_pb2.WorkflowStep) -> "Step":
        e = m.elements if m.HasField("elements") else None
        return cls(
            blocked=m.blocked,
            blocked_since=_time(m, "blocked_since"),
            retry_at=_time(m, "retry_at"),
            elements=None
            if e is None
            else Elements(e.total, e.waiting, e.live, e.completed, e.skipped, e.failed, e.scatter),
            children=[ElementChild(c.index, c.workflow_id, c.state) for c in m.children],
            subworkflow=m.subworkflow,
            id=m.id,
            job_type=m.job_type,
            state=m.state,
            attempts=m.attempts,
            job_id=m.job_id,
            agent=m.agent,
            request_id=m.request_id,
            request_state=m.request_state,
            attempt_history=[Attempt.from_pb(a) for a in m.attempt_history],
            declines=[Decline(d.agent, d.reason) for d in m.declines],
        )


@dataclass(frozen=True)
class WorkflowChange(_ToDict):
    """One change of one workflow, as :meth:`Client.watch_all` yields it."""

    workflow_id: str
    state: str
    created_at: Optional[datetime]
    finished_at: Optional[datetime]
    #: Changes the stream skipped before this one (the reader was slow).
    missed: int

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_pb(cls, m: manager_pb2.WorkflowChange) -> "WorkflowChange":
        return cls(
            workflow_id=m.workflow_id,
            state=m.state,
            created_at=_time(m, "created_at"),
            finished_at=_time(m, "finished_at"),
            missed=m.missed,
        )


@dataclass(frozen=True)
class Dataflow(_ToDict):
    """A dataflow edge and its value once delivered."""

    source: str
    destination: str
    value: Optional[str]


@dataclass(frozen=True)
class Workflow(_ToDict):
    """A workflow run as the manager sees it."""

    id: str
    template: str
    state: str
    message: str
    created_at: Optional[datetime]
    updated_at: Optional[datetime]
    finished_at: Optional[datetime]
    inputs: Dict[str, str]
    outputs: Dict[str, str]
    steps: List[Step]
    dataflows: List[Dataflow]

    @property
    def ended(self) -> bool:
        """True once the workflow is completed, failed or cancelled."""
        return self.state in TERMINAL_STATES

    def step(self, step_id: str) -> Step:
        """The step with this id (KeyError if there is none)."""
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(f"workflow {self.id} has no step {step_id!r}")

    @classmethod
    def from_pb(cls, m: manager_pb2.Workflow) -> "Workflow":
        return cls(
            id=m.id,
            template=m.template,
            state=m.state,
            message=m.message,
            created_at=_time(m, "created_at"),
            updated_at=_time(m, "updated_at"),
            finished_at=_time(m, "finished_at"),
            inputs=dict(m.inputs),
            outputs=dict(m.outputs),
            steps=[Step.from_pb(s) for s in m.steps],
            dataflows=[
                Dataflow(d.source, d.destination, _opt(d, "value")) for d in m.dataflows
            ],
        )


@dataclass(frozen=True)
class TemplateStep(_ToDict):
    """A step of a template as the node's CWL parser understood it."""

    id: str
    job_type: str
    inputs: List[str]
    outputs: List[str]


@dataclass(frozen=True)
class Template(_ToDict):
    """A registered workflow template."""

    name: str
    cwl: str
    inputs: List[str]
    outputs: List[str]
    steps: List[TemplateStep]
    updated_at: Optional[datetime]

    @classmethod
    def from_pb(cls, m: manager_pb2.Template) -> "Template":
        return cls(
            name=m.name,
            cwl=m.cwl,
            inputs=list(m.inputs),
            outputs=list(m.outputs),
            steps=[
                TemplateStep(s.id, s.job_type, list(s.inputs), list(s.outputs))
                for s in m.steps
            ],
            updated_at=_time(m, "updated_at"),
        )


@dataclass(frozen=True)
class DockerExecutor(_ToDict):
    """Runs the body in a container of ``image`` (see agent.proto)."""

    image: str
    cpus: float = 0.0
    memory: str = ""
    network: str = ""
    env: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class SlurmExecutor(_ToDict):
    """Runs each job as one Slurm batch job (see agent.proto)."""

    partition: str = ""
    time_limit: str = ""
    cpus: int = 0
    memory: str = ""
    sbatch: List[str] = field(default_factory=list)
    max_in_flight: int = 0


@dataclass(frozen=True)
class Price(_ToDict):
    """What a job costs, in credits (an abstract unit): a fixed part and a
    part per second of run time. The wire carries thousandths."""

    fixed: float = 0.0
    per_second: float = 0.0

    def to_pb(self) -> protocol_pb2.Price:
        return protocol_pb2.Price(
            fixed_milli=round(self.fixed * 1000),
            per_second_milli=round(self.per_second * 1000),
        )

    @classmethod
    def from_pb(cls, m: protocol_pb2.Price) -> "Price":
        return cls(fixed=m.fixed_milli / 1000, per_second=m.per_second_milli / 1000)


@dataclass(frozen=True)
class JobType(_ToDict):
    """What an agent can run: a bash body with named inputs and outputs,
    run by an executor (``bash``, ``docker`` or ``slurm``).

    ``timeout_seconds`` 0 and ``max_output_bytes`` 0 mean the agent's
    defaults (300 s, 1 MiB). Every field round-trips: ``put_job_type(
    job_type(name), replace=True)`` changes nothing.
    """

    name: str
    inputs: List[str]
    outputs: List[str]
    body: str
    timeout_seconds: int = 0
    max_output_bytes: int = 0
    updated_at: Optional[datetime] = field(default=None, compare=False)
    executor: str = ""
    docker: Optional[DockerExecutor] = None
    slurm: Optional[SlurmExecutor] = None
    price: Optional[Price] = None

    def to_pb(self) -> agent_pb2.JobType:
        m = agent_pb2.JobType(
            name=self.name,
            inputs=self.inputs,
            outputs=self.outputs,
            body=self.body,
            timeout_seconds=self.timeout_seconds,
            max_output_bytes=self.max_output_bytes,
            executor=self.executor,
        )
        if self.docker is not None:
            d = self.docker
            m.docker.CopyFrom(
                agent_pb2.DockerExecutor(
                    image=d.image, cpus=d.cpus, memory=d.memory, network=d.network, env=d.env
                )
            )
        if self.slurm is not None:
            sl = self.slurm
            m.slurm.CopyFrom(
                agent_pb2.SlurmExecutor(
                    partition=sl.partition,
                    time_limit=sl.time_limit,
                    cpus=sl.cpus,
                    memory=sl.memory,
                    sbatch=sl.sbatch,
                    max_in_flight=sl.max_in_flight,
                )
            )
        if self.price is not None:
            m.price.CopyFrom(self.price.to_pb())
        return m

    @classmethod
    def from_pb(cls, m: agent_pb2.JobType) -> "JobType":
        docker = None
        if m.HasField("docker"):
            d = m.docker
            docker = DockerExecutor(
                image=d.image, cpus=d.cpus, memory=d.memory, network=d.network, env=list(d.env)
            )
        slurm = None
        if m.HasField("slurm"):
            sl = m.slurm
            slurm = SlurmExecutor(
                partition=sl.partition,
                time_limit=sl.time_limit,
                cpus=sl.cpus,
                memory=sl.memory,
                sbatch=list(sl.sbatch),
                max_in_flight=sl.max_in_flight,
            )
        return cls(
            name=m.name,
            inputs=list(m.inputs),
            outputs=list(m.outputs),
            body=m.body,
            timeout_seconds=m.timeout_seconds,
            max_output_bytes=m.max_output_bytes,
            updated_at=_time(m, "updated_at"),
            executor=m.executor,
            docker=docker,
            slurm=slurm,
            price=Price.from_pb(m.price) if m.HasField("price") else None,
        )


@dataclass(frozen=True)
class Job(_ToDict):
    """A job held by an agent."""

    id: str
    manager: str
    workflow_id: str
    job_type: str
    state: str
    inputs: Dict[str, str]
    outputs: Dict[str, str]
    exit_status: Optional[int]
    message: str
    stderr_tail: str
    created_at: Optional[datetime]
    started_at: Optional[datetime]
    ended_at: Optional[datetime]

    @classmethod
    def from_pb(cls, m: agent_pb2.Job) -> "Job":
        return cls(
            id=m.id,
            manager=m.manager,
            workflow_id=m.workflow_id,
            job_type=m.job_type,
            state=m.state,
            inputs=dict(m.inputs),
            outputs=dict(m.outputs),
            exit_status=_opt(m, "exit_status"),
            message=m.message,
            stderr_tail=m.stderr_tail,
            created_at=_time(m, "created_at"),
            started_at=_time(m, "started_at"),
            ended_at=_time(m, "ended_at"),
        )


@dataclass(frozen=True)
class LogChunk(_ToDict):
    """A piece of an attempt's stdout or stderr (``to_dict`` gives
    ``data`` as text)."""

    step: str
    #: The attempt, from 1.
    attempt: int
    #: ``"stdout"`` or ``"stderr"``.
    stream: str
    #: Where ``data`` starts in that log.
    offset: int
    data: bytes
    job_id: str
    agent: str

    @property
    def text(self) -> str:
        """``data`` as text (invalid UTF-8 replaced)."""
        return self.data.decode("utf-8", "replace")

    @classmethod
    def from_pb(cls, m: manager_pb2.LogChunk) -> "LogChunk":
        return cls(
            step=m.step,
            attempt=m.attempt,
            stream=m.stream,
            offset=m.offset,
            data=bytes(m.data),
            job_id=m.job_id,
            agent=m.agent,
        )


@dataclass(frozen=True)
class NodeInfo(_ToDict):
    """Who a node is and how it is reachable."""

    node_id: str
    roles: List[str]
    api_listen: str
    peer_endpoint: str
    p2p_listen: List[str]
    version: str
    data_dir: str

    @classmethod
    def from_pb(cls, m: node_pb2.NodeInfo) -> "NodeInfo":
        return cls(
            node_id=m.node_id,
            roles=list(m.roles),
            api_listen=m.api_listen,
            peer_endpoint=m.peer_endpoint,
            p2p_listen=list(m.p2p_listen),
            version=m.version,
            data_dir=m.data_dir,
        )


@dataclass(frozen=True)
class Peer(_ToDict):
    """What a node knows about another node."""

    node_id: str
    p2p_address: str
    p2p_connected: bool
    endpoint: str
    queued: int
    delivered: int
    stream_open: bool
    last_error: str
    dropped: int
    confirmed: bool
    refused: int
    last_refusal: str

    @classmethod
    def from_pb(cls, m: node_pb2.Peer) -> "Peer":
        return cls(
            node_id=m.node_id,
            p2p_address=m.p2p_address,
            p2p_connected=m.p2p_connected,
            endpoint=m.endpoint,
            queued=m.queued,
            delivered=m.delivered,
            stream_open=m.stream_open,
            last_error=m.last_error,
            dropped=m.dropped,
            confirmed=m.confirmed,
            refused=m.refused,
            last_refusal=m.last_refusal,
        )


@dataclass(frozen=True)
class FileRef(_ToDict):
    """A file in a node's blob store, as workflows pass it: by its SHA-256,
    never by its bytes. ``str(f)`` is the value to give a ``File`` input."""

    sha256: str
    size: int
    basename: str

    def to_value(self) -> str:
        """The canonical text of the reference (a workflow value)."""
        import json

        return json.dumps(
            {"class": "File", "sha256": self.sha256, "size": self.size, "basename": self.basename},
            separators=(",", ":"),
            ensure_ascii=False,
        )

    def __str__(self) -> str:
        return self.to_value()

    @classmethod
    def parse(cls, value: str) -> "Optional[FileRef]":
        """The reference a value holds, if it is exactly one."""
        import json

        t = value.lstrip()
        if not t.startswith("{"):
            return None
        try:
            d = json.loads(t)
        except ValueError:
            return None
        if not isinstance(d, dict) or set(d) != {"class", "sha256", "size", "basename"}:
            return None
        if d["class"] != "File" or not isinstance(d["size"], int):
            return None
        sha = d["sha256"]
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            return None
        return cls(sha256=sha, size=d["size"], basename=str(d["basename"]))


def files_of(value: str) -> "List[FileRef]":
    """Every file reference a value holds: one ``File``, or the items of a
    ``File[]``; empty for any other value."""
    import json

    one = FileRef.parse(value)
    if one is not None:
        return [one]
    t = value.lstrip()
    if not t.startswith("[{"):
        return []
    try:
        items = json.loads(t)
    except ValueError:
        return []
    refs = [FileRef.parse(json.dumps(i, separators=(",", ":"), ensure_ascii=False)) for i in items]
    return [r for r in refs if r is not None] if all(r is not None for r in refs) else []
