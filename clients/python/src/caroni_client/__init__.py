"""Python client for Caroni nodes.

>>> from caroni_client import Client
>>> with Client("http://127.0.0.1:7070") as c:
...     wf = c.run("demo", {"start_message": "caronirocks"}, wait=True)
...     print(wf.outputs["result"])
prependCARONIROCKS append
"""

from ._generated.caroni.v1 import agent_pb2, manager_pb2, node_pb2
from .client import Client
from .errors import (
    AlreadyExists,
    CaroniError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .types import (
    TERMINAL_STATES,
    Attempt,
    Dataflow,
    Decline,
    DockerExecutor,
    FileRef,
    Job,
    JobType,
    LogChunk,
    Price,
    SlurmExecutor,
    NodeInfo,
    Peer,
    Step,
    Template,
    TemplateStep,
    Workflow,
    WorkflowChange,
    files_of,
)


class pb:  # noqa: N801 - a namespace, like a module
    """The generated protobuf modules, for what the typed layer leaves out."""

    manager = manager_pb2
    agent = agent_pb2
    node = node_pb2


__all__ = [
    "Client",
    "FileRef",
    "files_of",
    "CaroniError",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "TERMINAL_STATES",
    "Attempt",
    "Dataflow",
    "Decline",
    "DockerExecutor",
    "Job",
    "JobType",
    "LogChunk",
    "Price",
    "SlurmExecutor",
    "NodeInfo",
    "Peer",
    "Step",
    "Template",
    "TemplateStep",
    "Workflow",
    "WorkflowChange",
    "pb",
]
