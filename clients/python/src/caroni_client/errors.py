"""Errors raised by the client: one class per gRPC status a node returns,
each carrying the status code and the node's own message."""

from __future__ import annotations

from typing import Dict, Type

import grpc


class CaroniError(Exception):
    """A call to a node failed.

    ``code`` is the gRPC status (``grpc.StatusCode``); ``message`` is the
    node's explanation, which says what was wrong and what to do.
    """

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "") -> None:
        self.code = code
        self.message = message
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{code.name}: {message}")


class InvalidArgument(CaroniError):
    """The request was refused as invalid (a bad template, missing inputs…)."""


class NotFound(CaroniError):
    """No such workflow, template, job type or job."""


class AlreadyExists(CaroniError):
    """A job type of that name exists (pass ``replace=True`` to replace it)."""


class Unauthenticated(CaroniError):
    """The node wants an API token (``Client(url, token=...)``), or another one."""


class PermissionDenied(CaroniError):
    """The node refused the call."""


class FailedPrecondition(CaroniError):
    """The node cannot do this now (for example, it lacks the role)."""


class Unavailable(CaroniError):
    """The node could not be reached, or is shutting down."""


class DeadlineExceeded(CaroniError):
    """The call took longer than its timeout."""


class ResourceExhausted(CaroniError):
    """A limit of the node was reached (too many live workflows, too large)."""


_BY_CODE: Dict[grpc.StatusCode, Type[CaroniError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


def from_rpc_error(err: grpc.RpcError, method: str = "") -> CaroniError:
    """The exception for a failed call, keeping the node's message."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, CaroniError)
    return cls(code, details or "", method)
