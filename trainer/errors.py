"""Domain errors. The gRPC edge maps each class to one status code, once."""

from __future__ import annotations


class DomainError(Exception):
    """Base class: a request the service understood and refused."""


class InvalidArgument(DomainError):
    """The request is malformed; ``field`` names the part that was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(DomainError):
    """No such object for this tenant (also said of another tenant's object)."""


class AlreadyExists(DomainError):
    """An object with this name exists, or a job for this adapter name is active."""


class FailedPrecondition(DomainError):
    """The request is valid but the system is not in a state that allows it."""


class ResourceExhausted(DomainError):
    """A size or quota limit was passed."""


class StorageFull(ResourceExhausted):
    """The disk under the service's data is full; nothing of the request was kept."""


class Unauthenticated(DomainError):
    """No key, or a key that belongs to no tenant."""


class PermissionDenied(DomainError):
    """A valid key that may not do this."""


class Unavailable(DomainError):
    """A service this one depends on (vLLM, the job store, object storage) did not answer
    or confirm; nothing was changed, and the call may be retried."""
