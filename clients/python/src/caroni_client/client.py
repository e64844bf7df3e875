"""The typed client: one ``Client`` per node, over its gRPC client API."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import (
    Dict,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    overload,
)
from urllib.parse import urlparse

import grpc

from ._generated.caroni.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    files_pb2,
    files_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from .errors import CaroniError, Unavailable, from_rpc_error
from .types import (
    FileRef,
    Job,
    JobType,
    LogChunk,
    NodeInfo,
    Peer,
    Template,
    Workflow,
    WorkflowChange,
    files_of,
)

#: Chunks of uploads and downloads (the node takes at most 1 MiB per message).
CHUNK = 1 << 20

#: A workflow input: text, or a file (a path, or a reference already
#: uploaded), or a list of files for a ``File[]`` input.
InputValue = Union[str, "os.PathLike[str]", FileRef, Sequence[Union["os.PathLike[str]", FileRef]]]

#: The largest response accepted (the node keeps list responses under 3 MiB).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Client:
    """A connection to one Caroni node's client API.

    ``url`` is the node's ``--api-listen`` address: ``http://host:port``,
    ``https://host:port`` (TLS; ``ca`` is the PEM file of the CA that signed
    the node's certificate, or the system's roots when omitted), or a bare
    ``host:port`` (plaintext). ``token`` is the node's ``--api-token``.
    ``timeout`` bounds every call but ``watch`` (seconds).

    Every failed call raises a :class:`caroni_client.CaroniError` subclass
    carrying the gRPC status code and the node's message.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:7070",
        token: Optional[str] = None,
        *,
        ca: Optional[str] = None,
        timeout: float = 30.0,
    ) -> None:
        target, secure = _parse_url(url)
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if secure:
            roots = None
            if ca is not None:
                with open(ca, "rb") as f:
                    roots = f.read()
            creds = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            if ca is not None:
                raise ValueError(
                    f"a CA was given but {url!r} is not an https:// URL; "
                    "use https://host:port for a node with --api-tls-cert"
                )
            self._channel = grpc.insecure_channel(target, options=options)
        self.url = url
        self.timeout = timeout
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._manager = manager_pb2_grpc.ManagerServiceStub(self._channel)
        self._agent = agent_pb2_grpc.AgentServiceStub(self._channel)
        self._node = node_pb2_grpc.NodeServiceStub(self._channel)
        self._files = files_pb2_grpc.FileServiceStub(self._channel)

    # -- plumbing -------------------------------------------------------

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def _submit(self, method, request, name: str, tries: int = 4):
        """A call that is safe to repeat (it carries a request id): tried
        again on UNAVAILABLE and DEADLINE_EXCEEDED within about 2 s
        (0.25 s, 0.5 s, 1 s apart); a node that stays unavailable is
        reported."""
        delay = 0.25
        for n in range(tries):
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                retry = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retry or n + 1 == tries:
                    raise from_rpc_error(e, name) from None
                time.sleep(delay)
                delay *= 2

    def retry_workflow(self, workflow_id: str) -> Workflow:
        """Resume a failed or cancelled workflow from its unfinished steps
        (completed steps keep their outputs)."""
        req = manager_pb2.GetWorkflowRequest(workflow_id=workflow_id)
        return Workflow.from_pb(self._call(self._manager.RetryWorkflow, req, "RetryWorkflow"))

    def rerun_workflow(
        self,
        workflow_id: str,
        inputs: Optional[Mapping[str, "InputValue"]] = None,
        request_id: Optional[str] = None,
    ) -> str:
        """Start a new workflow with the same template and inputs, some
        replaced; returns its id."""
        values = {name: self._value(v) for name, v in (inputs or {}).items()}
        req = manager_pb2.RerunWorkflowRequest(
            workflow_id=workflow_id, inputs=values, request_id=request_id or str(uuid.uuid4())
        )
        return self._submit(self._manager.RerunWorkflow, req, "RerunWorkflow").workflow_id

    def delete_workflow(self, workflow_id: str) -> int:
        """Delete an ended workflow and everything kept of it; returns how
        many workflows (its elements' included) went."""
        req = manager_pb2.GetWorkflowRequest(workflow_id=workflow_id)
        return self._call(self._manager.DeleteWorkflow, req, "DeleteWorkflow").deleted

    def logs(
        self,
        workflow_id: str,
        step: str = "",
        attempt: int = 0,
        stream: str = "",
        follow: bool = False,
        timeout: Optional[float] = None,
    ) -> Iterator[LogChunk]:
        """An attempt's stdout and stderr, read from the agent that ran it.

        ``step`` may be left out for a workflow of one step; ``attempt``
        counts from 1 (0: the latest that reached an agent); ``stream`` is
        ``"stdout"``, ``"stderr"`` or ``""`` for both. With ``follow``, the
        iterator goes on while the job runs and stops when it has ended.
        ``timeout`` (seconds) bounds the whole read.
        """
        req = manager_pb2.GetLogsRequest(
            workflow_id=workflow_id, step=step, attempt=attempt, stream=stream, follow=follow
        )
        try:
            for c in self._manager.GetLogs(req, timeout=timeout, metadata=self._metadata):
                yield LogChunk.from_pb(c)
        except grpc.RpcError as e:
            raise from_rpc_error(e, "GetLogs") from None

    def log_text(self, workflow_id: str, step: str = "", attempt: int = 0) -> Tuple[str, str]:
        """An attempt's whole stdout and stderr as text (invalid UTF-8
        replaced)."""
        out, err = bytearray(), bytearray()
        for c in self.logs(workflow_id, step=step, attempt=attempt, timeout=self.timeout):
            (out if c.stream == "stdout" else err).extend(c.data)
        return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def _call(self, method, request, name: str):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, name) from None

    # -- the node -------------------------------------------------------

    def node_info(self) -> NodeInfo:
        """Who the node is: id, roles, addresses, version."""
        return NodeInfo.from_pb(
            self._call(self._node.GetInfo, node_pb2.GetInfoRequest(), "GetInfo")
        )

    def peers(self) -> List[Peer]:
        """The node's peers and its outbox towards each."""
        r = self._call(self._node.ListPeers, node_pb2.ListPeersRequest(), "ListPeers")
        return [Peer.from_pb(p) for p in r.peers]

    def stats(self) -> Dict[str, float]:
        """Counters since the node started (what ``caroni bench`` reports)."""
        r = self._call(self._node.GetStats, node_pb2.GetStatsRequest(), "GetStats")
        return {f.name: getattr(r, f.name) for f in r.DESCRIPTOR.fields}

    # -- templates (manager) --------------------------------------------

    def put_template(self, name: str, cwl: str) -> Template:
        """Register or replace a template. An invalid CWL document raises
        :class:`InvalidArgument` with the parser's message."""
        req = manager_pb2.PutTemplateRequest(name=name, cwl=cwl)
        return Template.from_pb(self._call(self._manager.PutTemplate, req, "PutTemplate"))

    def templates(self) -> List[Template]:
        """Every template, by name (without the CWL text)."""
        r = self._call(
            self._manager.ListTemplates, manager_pb2.ListTemplatesRequest(), "ListTemplates"
        )
        return [Template.from_pb(t) for t in r.templates]

    def template(self, name: str) -> Template:
        """One template with its CWL text."""
        req = manager_pb2.GetTemplateRequest(name=name)
        return Template.from_pb(self._call(self._manager.GetTemplate, req, "GetTemplate"))

    def delete_template(self, name: str) -> None:
        """Remove a template; running workflows keep their copy."""
        req = manager_pb2.DeleteTemplateRequest(name=name)
        self._call(self._manager.DeleteTemplate, req, "DeleteTemplate")

    # -- workflows (manager) --------------------------------------------

    @overload
    def run(
        self,
        template: str,
        inputs: Mapping[str, InputValue],
        wait: Literal[False] = False,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> str: ...

    @overload
    def run(
        self,
        template: str,
        inputs: Mapping[str, InputValue],
        wait: Literal[True],
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> Workflow: ...

    def run(
        self,
        template: str,
        inputs: Mapping[str, InputValue],
        wait: bool = False,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> Union[str, Workflow]:
        """Start a workflow from a template.

        A value is text, or a file for a ``File`` input: a path
        (``pathlib.Path``; uploaded first, streamed, never read whole) or a
        ``FileRef`` already uploaded; a list of them for a ``File[]`` input.
        Returns its id once the workflow is durable on the manager; with
        ``wait=True``, watches it and returns the ended workflow instead
        (``timeout`` bounds the wait, in seconds).

        The submission carries ``request_id`` (a fresh UUID when not
        given); an answer lost to UNAVAILABLE or DEADLINE_EXCEEDED is asked
        for again with the same id, so the workflow is made once.
        """
        values = {name: self._value(v) for name, v in inputs.items()}
        req = manager_pb2.RunWorkflowRequest(
            template=template, inputs=values, request_id=request_id or str(uuid.uuid4())
        )
        wid = self._submit(self._manager.RunWorkflow, req, "RunWorkflow").workflow_id
        if not wait:
            return wid
        last = None
        for last in self.watch(wid, timeout=timeout):
            pass
        assert last is not None  # watch yields at least the current state
        return last

    def _value(self, v: InputValue) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, FileRef):
            return v.to_value()
        if isinstance(v, os.PathLike):
            return self.upload(v).to_value()
        refs = [x if isinstance(x, FileRef) else self.upload(x) for x in v]
        return "[" + ",".join(r.to_value() for r in refs) + "]"

    # -- files ----------------------------------------------------------

    def upload(self, path: "os.PathLike[str]") -> FileRef:
        """Store a file on the node; returns the reference to pass as a
        ``File`` input. Streamed in 1 MiB chunks (the file is never held in
        memory), resumed from what the node already holds, checked by its
        SHA-256 on the node."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p} is not a file")
        h = hashlib.sha256()
        size = 0
        with p.open("rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
                size += len(block)
        ref = FileRef(sha256=h.hexdigest(), size=size, basename=p.name)
        st = self._call(
            self._files.UploadStatus,
            files_pb2.UploadStatusRequest(sha256=ref.sha256),
            "UploadStatus",
        )
        if st.complete:
            return ref
        offset = min(st.committed, size)

        def chunks():
            with p.open("rb") as f:
                f.seek(offset)
                first = files_pb2.FileRef(sha256=ref.sha256, size=size, basename=ref.basename)
                block = f.read(CHUNK)
                yield files_pb2.UploadChunk(file=first, offset=offset, data=block)
                while block:
                    block = f.read(CHUNK)
                    if block:
                        yield files_pb2.UploadChunk(data=block)

        try:
            # No deadline: a large file takes as long as it takes.
            got = self._files.Upload(chunks(), metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, "Upload") from None
        if got.sha256 != ref.sha256:
            raise CaroniError(f"the node stored {p} under another hash")
        return ref

    def download(
        self,
        what: Union[FileRef, str],
        to: "os.PathLike[str]",
        output: Optional[str] = None,
    ) -> Path:
        """Write a file to ``to``: a ``FileRef``, or the File output
        ``output`` of workflow ``what`` (its only File output when not
        given). Streamed, resumed from ``to + '.part'``, checked by its
        SHA-256; the file appears at ``to`` only whole."""
        if isinstance(what, FileRef):
            ref = what
        else:
            w = self.show(what)
            found = {k: files_of(v) for k, v in w.outputs.items()}
            found = {k: v for k, v in found.items() if len(v) == 1}
            if output is not None:
                if output not in found:
                    raise CaroniError(f"workflow {what} has no File output {output!r}")
                ref = found[output][0]
            elif len(found) == 1:
                ref = next(iter(found.values()))[0]
            else:
                raise CaroniError(
                    f"workflow {what} has {len(found)} File outputs; name one with output="
                )
        dest = Path(to)
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        if have > ref.size:
            part.unlink()
            have = 0
        h = hashlib.sha256()
        if have:
            with part.open("rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    h.update(block)
        req = files_pb2.DownloadRequest(sha256=ref.sha256, offset=have)
        try:
            with part.open("ab") as out:
                for c in self._files.Download(req, metadata=self._metadata):
                    if c.offset != have:
                        raise CaroniError(f"the node sent bytes from {c.offset}, not {have}")
                    out.write(c.data)
                    h.update(c.data)
                    have += len(c.data)
                out.flush()
                os.fsync(out.fileno())
        except grpc.RpcError as e:
            raise from_rpc_error(e, "Download") from None
        if have != ref.size:
            raise CaroniError(f"the download stopped at byte {have} of {ref.size}; call again to resume")
        if h.hexdigest() != ref.sha256:
            part.unlink()
            raise CaroniError(f"{ref.basename} did not hash to {ref.sha256}; it was deleted")
        part.replace(dest)
        return dest

    def show(self, workflow_id: str) -> Workflow:
        """One workflow with its steps, attempts, declines and dataflows."""
        req = manager_pb2.GetWorkflowRequest(workflow_id=workflow_id)
        return Workflow.from_pb(self._call(self._manager.GetWorkflow, req, "GetWorkflow"))

    def list_workflows(
        self,
        limit: int = 100,
        states: Sequence[str] = (),
        template: str = "",
        created_after: Optional["datetime"] = None,
        created_before: Optional["datetime"] = None,
        id_prefix: str = "",
    ) -> List[Workflow]:
        """Workflows users started, newest first, filtered, at most
        ``limit``, without attempts and dataflows; values over 1 KiB are
        shortened (``show`` has them). :meth:`iter_workflows` pages
        through all of them."""
        out: List[Workflow] = []
        for w in self.iter_workflows(
            states, template, created_after, created_before, id_prefix, page=min(limit, 1000)
        ):
            out.append(w)
            if len(out) >= limit:
                break
        return out

    def iter_workflows(
        self,
        states: Sequence[str] = (),
        template: str = "",
        created_after: Optional["datetime"] = None,
        created_before: Optional["datetime"] = None,
        id_prefix: str = "",
        page: int = 200,
    ) -> Iterator[Workflow]:
        """Every matching workflow, newest first, a page at a time (the
        whole history, not only the newest 1,000)."""
        token = ""
        while True:
            req = manager_pb2.ListWorkflowsRequest(
                limit=page,
                states=list(states),
                template=template,
                id_prefix=id_prefix,
                page_token=token,
            )
            if created_after is not None:
                req.created_after.FromDatetime(created_after)
            if created_before is not None:
                req.created_before.FromDatetime(created_before)
            r = self._call(self._manager.ListWorkflows, req, "ListWorkflows")
            for w in r.workflows:
                yield Workflow.from_pb(w)
            if not r.next_page_token:
                return
            token = r.next_page_token

    def cancel(self, workflow_id: str) -> Workflow:
        """End a workflow as cancelled; its running jobs are killed."""
        req = manager_pb2.GetWorkflowRequest(workflow_id=workflow_id)
        return Workflow.from_pb(
            self._call(self._manager.CancelWorkflow, req, "CancelWorkflow")
        )

    def watch(self, workflow_id: str, timeout: Optional[float] = None) -> Iterator[Workflow]:
        """The workflow now, then again each time it changes, until it ends.

        The iterator stops after the workflow reaches ``completed``,
        ``failed`` or ``cancelled``. If the node restarts meanwhile, the
        watch reconnects and goes on (an unchanged state is not repeated).
        ``timeout`` (seconds) bounds the whole watch; when it passes,
        :class:`DeadlineExceeded` is raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        req = manager_pb2.GetWorkflowRequest(workflow_id=workflow_id)
        last: Optional[Workflow] = None
        backoff = 0.1
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            stream = self._manager.WatchWorkflow(req, timeout=left, metadata=self._metadata)
            try:
                for msg in stream:
                    w = Workflow.from_pb(msg)
                    backoff = 0.1
                    if w != last:
                        last = w
                        yield w
                    if w.ended:
                        return
            except grpc.RpcError as e:
                err = from_rpc_error(e, "WatchWorkflow")
                if not isinstance(err, Unavailable):
                    raise err from None
                if deadline is not None and time.monotonic() + backoff > deadline:
                    raise err from None
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            finally:
                stream.cancel()
            if last is not None and last.ended:
                return
            # The stream ended without the workflow ending: the node is
            # going away; reconnect.
            time.sleep(backoff)

    def watch_all(self, timeout: Optional[float] = None) -> Iterator[WorkflowChange]:
        """Every change of every workflow on the manager, as it is written
        (one stream for all; a slow reader is told how many it missed).
        Runs until the node closes the stream or ``timeout`` (seconds)
        passes (then :class:`DeadlineExceeded`)."""
        stream = self._manager.WatchWorkflows(
            manager_pb2.WatchWorkflowsRequest(), timeout=timeout, metadata=self._metadata
        )
        try:
            for msg in stream:
                yield WorkflowChange.from_pb(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e, "WatchWorkflows") from None
        finally:
            stream.cancel()

    # -- job types and jobs (agent) -------------------------------------

    def put_job_type(self, job_type: JobType, replace: bool = False) -> JobType:
        """Create a job type; with ``replace=True``, replace an existing one.
        Creating an existing name raises :class:`AlreadyExists`; an invalid
        definition raises :class:`InvalidArgument` with the reason."""
        req = agent_pb2.PutJobTypeRequest(job_type=job_type.to_pb(), replace=replace)
        return JobType.from_pb(self._call(self._agent.PutJobType, req, "PutJobType"))

    def job_types(self) -> List[JobType]:
        """Every job type, by name."""
        r = self._call(
            self._agent.ListJobTypes, agent_pb2.ListJobTypesRequest(), "ListJobTypes"
        )
        return [JobType.from_pb(t) for t in r.job_types]

    def job_type(self, name: str) -> JobType:
        """One job type."""
        req = agent_pb2.GetJobTypeRequest(name=name)
        return JobType.from_pb(self._call(self._agent.GetJobType, req, "GetJobType"))

    def delete_job_type(self, name: str) -> None:
        """Remove a job type."""
        req = agent_pb2.DeleteJobTypeRequest(name=name)
        self._call(self._agent.DeleteJobType, req, "DeleteJobType")

    def jobs(self, limit: int = 100) -> List[Job]:
        """Jobs held by this agent, newest first."""
        r = self._call(self._agent.ListJobs, agent_pb2.ListJobsRequest(limit=limit), "ListJobs")
        return [Job.from_pb(j) for j in r.jobs]

    def job(self, job_id: str) -> Job:
        """One job held by this agent."""
        req = agent_pb2.GetJobRequest(job_id=job_id)
        return Job.from_pb(self._call(self._agent.GetJob, req, "GetJob"))


def _parse_url(url: str):
    """(target, secure) for a node URL."""
    if "://" not in url:
        return url, False
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ValueError(
            f"cannot use {url!r} as a node address: give http://host:port, "
            "https://host:port or host:port"
        )
    return u.netloc, u.scheme == "https"


__all__ = ["Client", "CaroniError"]
