"""The typed client: one ``Client`` per node, over its gRPC client API."""

from __future__ import annotations

import time
from typing import Dict, Iterator, List, Literal, Mapping, Optional, Union, overload
from urllib.parse import urlparse

import grpc

from ._generated.caroni.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from .errors import CaroniError, Unavailable, from_rpc_error
from .types import Job, JobType, NodeInfo, Peer, Template, Workflow

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
        inputs: Mapping[str, str],
        wait: Literal[False] = False,
        timeout: Optional[float] = None,
    ) -> str: ...

    @overload
    def run(
        self,
        template: str,
        inputs: Mapping[str, str],
        wait: Literal[True],
        timeout: Optional[float] = None,
    ) -> Workflow: ...

    def run(
        self,
        template: str,
        inputs: Mapping[str, str],
        wait: bool = False,
        timeout: Optional[float] = None,
    ) -> Union[str, Workflow]:
        """Start a workflow from a template.

        Returns its id once the workflow is durable on the manager; with
        ``wait=True``, watches it and returns the ended workflow instead
        (``timeout`` bounds the wait, in seconds).
        """
        req = manager_pb2.RunWorkflowRequest(template=template, inputs=dict(inputs))
        wid = self._call(self._manager.RunWorkflow, req, "RunWorkflow").workflow_id
        if not wait:
            return wid
        last = None
        for last in self.watch(wid, timeout=timeout):
            pass
        assert last is not None  # watch yields at least the current state
        return last

    def show(self, workflow_id: str) -> Workflow:
        """One workflow with its steps, attempts, declines and dataflows."""
        req = manager_pb2.GetWorkflowRequest(workflow_id=workflow_id)
        return Workflow.from_pb(self._call(self._manager.GetWorkflow, req, "GetWorkflow"))

    def list_workflows(self, limit: int = 100) -> List[Workflow]:
        """Workflows, newest first (at most 1000), without attempts and
        dataflows; values over 1 KiB are shortened (``show`` has them)."""
        req = manager_pb2.ListWorkflowsRequest(limit=limit)
        r = self._call(self._manager.ListWorkflows, req, "ListWorkflows")
        return [Workflow.from_pb(w) for w in r.workflows]

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
