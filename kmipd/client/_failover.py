"""Which daemon to ask, and whether a failed request may be asked again elsewhere.

Sans-IO, like the protocol core: the blocking and the trio client both
drive it, and tests drive it with a fake clock and a seeded random source.

Servers are tried in the configured order (a primary and its standbys, as
storage systems configure KMIP servers), skipping those in back-off. A
failure puts a server in back-off for an exponentially growing, fully
jittered delay (so a fleet of clients does not retry in lockstep); the
first success brings it back. When every server is in back-off, the caller
waits for the earliest one, within its deadline.

Whether a request may be retried depends on what is known about the failed
attempt:

* NOT_SENT (no connection, handshake failed) or REFUSED (the server
  answered busy, shutting-down, hsm-unavailable or store-unavailable):
  certainly not applied, so any request may go to another server;
* UNKNOWN (sent, then the connection broke or the deadline passed, or the
  server answered store-outcome-unknown: its database went away during COMMIT):
  idempotent requests may be retried anywhere; a create carries an
  idempotency key, so it may be retried on any server sharing the first
  one's store (same ``store-id`` in hello), where the key makes a second
  application impossible. Otherwise the caller gets OutcomeUnknownError,
  with the key, to retry later.
"""

from __future__ import annotations

import enum
import random
import threading
import time
from collections.abc import Callable, Sequence

import attrs

from kmipd.client._common import Endpoint
from kmipd.client._errors import (
    DeadlineExceededError,
    KmipdError,
    OutcomeUnknownError,
    UnavailableError,
    remote_error,
)
from kmipd.protocol import OPERATIONS, ErrorCode, ErrorInfo

#: Remote errors meaning "not applied here, try another server".
FAILOVER_CODES = frozenset(
    {
        ErrorCode.BUSY,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.HSM_UNAVAILABLE,
        ErrorCode.STORE_UNAVAILABLE,
    }
)


class Attempt(enum.Enum):
    NOT_SENT = "not-sent"
    REFUSED = "refused"
    UNKNOWN = "unknown"


@attrs.define(eq=False)
class ServerState:
    endpoint: Endpoint
    failures: int = 0
    retry_at: float = 0.0
    #: From the server's hello: servers with the same store-id share their keys.
    store_id: str | None = None

    @property
    def address(self) -> str:
        return self.endpoint.address


class ServerSet:
    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        backoff_base: float = 0.1,
        backoff_cap: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one server address is needed")
        self.servers = [ServerState(endpoint) for endpoint in endpoints]
        self._base = backoff_base
        self._cap = backoff_cap
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self._lock = threading.Lock()

    def choose(
        self, exclude: set[str], eligible: Callable[[ServerState], bool] = lambda s: True
    ) -> tuple[ServerState, float] | None:
        """The next server to try and how long to wait first (0 unless all are backing off)."""
        now = self._clock()
        with self._lock:
            candidates = [s for s in self.servers if s.address not in exclude and eligible(s)]
            if not candidates:
                return None
            ready = [s for s in candidates if s.retry_at <= now]
            if ready:
                return ready[0], 0.0
            soonest = min(candidates, key=lambda s: s.retry_at)
            return soonest, soonest.retry_at - now

    def succeeded(self, server: ServerState, store_id: str | None) -> None:
        with self._lock:
            server.failures = 0
            server.retry_at = 0.0
            if store_id is not None:
                server.store_id = store_id

    def failed(self, server: ServerState) -> float:
        """Put the server in back-off; return the delay chosen."""
        with self._lock:
            server.failures += 1
            ceiling = min(self._cap, self._base * 2 ** (server.failures - 1))
            delay = self._rng.uniform(0, ceiling)  # "full jitter"
            server.retry_at = self._clock() + delay
            return delay


def may_retry(request: object, attempt: Attempt) -> bool:
    """Whether another server may see this request after ``attempt`` failed."""
    if attempt is not Attempt.UNKNOWN:
        return True
    return OPERATIONS[request.OPERATION].idempotent  # type: ignore[attr-defined]


def carries_idempotency_key(request: object) -> bool:
    return getattr(request, "idempotency_key", None) is not None


class FailoverCall:
    """One call's way across the daemons: what was tried, and what a failure allows next.

    The shells loop: ``next_server`` (which raises the final error when no
    daemon is left or the deadline has passed), then report what happened
    with ``not_sent``, ``lost`` or ``answered``.
    """

    def __init__(
        self,
        servers: ServerSet,
        requests: Sequence[object],
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._servers = servers
        self._requests = requests
        self._timeout = timeout
        self._clock = clock
        self.deadline = clock() + timeout
        self._tried: set[str] = set()
        #: Set once a create's outcome is unknown: only its store may settle it.
        self._store: str | None = None
        self._last: KmipdError | None = None

    def next_server(self) -> tuple[ServerState, float]:
        """The daemon to try now, and how long to wait first."""
        store = self._store
        # A server not met yet may share the store: connecting tells (see accepts).
        choice = self._servers.choose(
            self._tried, lambda s: store is None or s.store_id in (None, store)
        )
        if choice is None:
            raise self._final_error()
        server, wait = choice
        if self._clock() + wait >= self.deadline:
            raise self._final_error(timed_out=True)
        return server, wait

    def not_sent(self, server: ServerState, error: KmipdError) -> None:
        """No connection, or the handshake failed: nothing reached the daemon."""
        self._servers.failed(server)
        self._tried.add(server.address)
        self._last = error

    def lost(self, server: ServerState, error: KmipdError) -> None:
        """Sent, then the connection broke or the deadline passed: outcome unknown."""
        self._servers.failed(server)
        self._tried.add(server.address)
        self._last = error
        if isinstance(error, DeadlineExceededError) or self._clock() >= self.deadline:
            raise self._final_error(timed_out=True, store=server.store_id)
        if all(may_retry(r, Attempt.UNKNOWN) for r in self._requests):
            return
        if not all(carries_idempotency_key(r) for r in self._requests):
            raise error
        self._store = server.store_id

    def accepts(self, server: ServerState, store_id: str | None) -> bool:
        """Once connected (hello said its store): may this server receive the request?"""
        if store_id is not None:
            self._servers.succeeded(server, store_id)
        if self._store is None or store_id == self._store:
            return True
        self._tried.add(server.address)  # another store cannot settle the unknown create
        return False

    def answered(
        self, server: ServerState, store_id: str | None, outcomes: Sequence[object]
    ) -> bool:
        """True when the answer stands; False when the daemon refused (try another)."""
        self._servers.succeeded(server, store_id)
        unknown = next(
            (
                o
                for o in outcomes
                if isinstance(o, ErrorInfo) and o.code is ErrorCode.STORE_OUTCOME_UNKNOWN
            ),
            None,
        )
        if unknown is not None:
            # The write may have committed: settled as a lost connection's outcome is.
            self.lost(server, remote_error(unknown, server=server.address, request_id=None))
            return False
        refused = next(
            (o for o in outcomes if isinstance(o, ErrorInfo) and o.code in FAILOVER_CODES), None
        )
        if refused is None:
            return True
        self._tried.add(server.address)
        self._last = remote_error(refused, server=server.address, request_id=None)
        return False

    def _final_error(self, *, timed_out: bool = False, store: str | None = None) -> KmipdError:
        keys = [r.idempotency_key for r in self._requests if carries_idempotency_key(r)]  # type: ignore[attr-defined]
        last = f" (last: {self._last.detail})" if self._last else ""
        if keys and (self._store is not None or store is not None):
            return OutcomeUnknownError(
                "the create was sent but its answer was lost, and no daemon sharing its store "
                "could settle it; call create_dek again with the same idempotency_key" + last,
                idempotency_key=keys[0],
                server=self._last.server if self._last else "",
            )
        if timed_out:
            return DeadlineExceededError(
                f"no daemon answered within {self._timeout:g} s" + last,
                server=self._last.server if self._last else "",
            )
        if self._last is not None:
            return self._last
        return UnavailableError("no daemon could be reached")
