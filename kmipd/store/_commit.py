"""The point of no return of a request: its first durable write.

A draining server cancels the requests still running when its bound runs
out and answers them ``shutting-down``, which promises the request was not
applied. That promise holds only if a request that has started writing can
no longer be cancelled: ``KeyService.handle`` opens a cancel scope per
request, and the store shields it just before its first write, so from
there the request runs to its answer. Outside a request (maintenance, the
rewrap runner, tools) there is no scope and this does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import trio

_request_scope: ContextVar[trio.CancelScope | None] = ContextVar("_request_scope", default=None)


@contextlib.contextmanager
def request_scope() -> Iterator[None]:
    """Run one request in a scope that ``point_of_no_return`` can shield."""
    with trio.CancelScope() as scope:
        token = _request_scope.set(scope)
        try:
            yield
        finally:
            _request_scope.reset(token)


def point_of_no_return() -> None:
    """Called before a durable write: the running request must now finish."""
    scope = _request_scope.get()
    if scope is not None:
        scope.shield = True
