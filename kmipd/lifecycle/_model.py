"""Key lifecycle after KMIP 2.1 and NIST SP 800-57: states, dates, usage, as data.

Every KEK version and every DEK carries a Lifecycle: its state, the dates
that bound its use, and the usage set fixed when it was made.

States and the only transitions between them (KMIP 2.1, "Object States"):

    pre-active ──activate / activation date──▶ active
    pre-active ──deactivation date / revoke──▶ deactivated
    active ──revoke (not compromise) / deactivation date──▶ deactivated
    pre-active, active, deactivated ──revoke (key compromise)──▶ compromised
    pre-active, deactivated ──destroy──▶ destroyed
    compromised ──destroy──▶ destroyed-compromised
    destroyed ──revoke (key compromise)──▶ destroyed-compromised

An active key cannot be destroyed: revoke (deactivate) it first, as KMIP
requires. "Destroyed" means the material is gone. The soft-delete window
(like Azure Key Vault's) comes *before* that transition: a destroy request
schedules it (``purge_at``), the key stays in its state but refuses every
use, ``recover`` cancels the schedule, and when the window ends the DESTROY
transition is applied and the material erased. Dates (seconds since the
epoch, unset = no bound):

* activation: the key may be used from then on;
* protect-stop: end of the originator usage period: no new wrapping, no new
  DEK generation, no encrypting with a DEK after it;
* process-start: unwrapping/decrypting allowed from then on;
* deactivation: end of the recipient usage period: no unwrapping after it.

A key past protect-stop but before deactivation still unwraps: that is how a
storage system keeps reading old data while writing under a newer key.
"""

from __future__ import annotations

import enum
import fnmatch
from typing import Any, Final

import attrs


class State(enum.Enum):
    PRE_ACTIVE = "pre-active"
    ACTIVE = "active"
    DEACTIVATED = "deactivated"
    COMPROMISED = "compromised"
    DESTROYED = "destroyed"
    DESTROYED_COMPROMISED = "destroyed-compromised"


class Event(enum.Enum):
    ACTIVATE = "activate"  # the operation, or the activation date reached
    DEACTIVATE = "deactivate"  # a non-compromise revocation, or the deactivation date
    COMPROMISE = "compromise"  # revocation with reason key-compromise
    DESTROY = "destroy"  # applied when the material is erased (end of the soft-delete window)


_S, _E = State, Event

#: (state, event) -> next state. Anything not listed is refused (wrong-state).
TRANSITIONS: Final[dict[tuple[State, Event], State]] = {
    (_S.PRE_ACTIVE, _E.ACTIVATE): _S.ACTIVE,
    (_S.PRE_ACTIVE, _E.DEACTIVATE): _S.DEACTIVATED,
    (_S.PRE_ACTIVE, _E.COMPROMISE): _S.COMPROMISED,
    (_S.PRE_ACTIVE, _E.DESTROY): _S.DESTROYED,
    (_S.ACTIVE, _E.DEACTIVATE): _S.DEACTIVATED,
    (_S.ACTIVE, _E.COMPROMISE): _S.COMPROMISED,
    (_S.DEACTIVATED, _E.COMPROMISE): _S.COMPROMISED,
    (_S.DEACTIVATED, _E.DESTROY): _S.DESTROYED,
    (_S.COMPROMISED, _E.DESTROY): _S.DESTROYED_COMPROMISED,
    (_S.DESTROYED, _E.COMPROMISE): _S.DESTROYED_COMPROMISED,
}

DESTROYED_STATES = frozenset({State.DESTROYED, State.DESTROYED_COMPROMISED})


class RevocationReason(enum.Enum):
    """KMIP Revocation Reason Codes (RFC 5280 CRLReason names, in our spelling)."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "key-compromise"
    CA_COMPROMISE = "ca-compromise"
    AFFILIATION_CHANGED = "affiliation-changed"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessation-of-operation"
    PRIVILEGE_WITHDRAWN = "privilege-withdrawn"


def revocation_event(reason: RevocationReason) -> Event:
    compromised = reason in (RevocationReason.KEY_COMPROMISE, RevocationReason.CA_COMPROMISE)
    return Event.COMPROMISE if compromised else Event.DEACTIVATE


class Usage(enum.Enum):
    """What a key may do; fixed when the key is made (one purpose per key)."""

    WRAP = "wrap"  # KEK: protect DEKs
    UNWRAP = "unwrap"  # KEK: recover DEKs
    ENCRYPT = "encrypt"  # DEK: protect data
    DECRYPT = "decrypt"  # DEK: recover data
    SIGN = "sign"  # signing key's private half
    VERIFY = "verify"  # signing key's public half


KEK_USAGES: Final = frozenset({Usage.WRAP, Usage.UNWRAP})
DEK_USAGES: Final = frozenset({Usage.ENCRYPT, Usage.DECRYPT})
#: A signing key's: its private half signs until protect-stop (the end of its signing
#: period), its public half verifies until deactivation.
SIGNING_USAGES: Final = frozenset({Usage.SIGN, Usage.VERIFY})


class LifecycleError(Exception):
    """A use or a transition the key's state, dates or usage forbid."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        #: "wrong-state", "usage-not-permitted", "not-yet-active", "protect-stop-passed",
        #: "deactivated", "compromised", "destroyed", "destroy-pending": the service maps
        #: these to wire codes.
        self.reason = reason
        self.message = message


@attrs.frozen
class Lifecycle:
    state: State
    usage: frozenset[Usage]
    activation: int | None = None
    protect_stop: int | None = None
    process_start: int | None = None
    deactivation: int | None = None
    compromise_date: int | None = None
    destroy_date: int | None = None
    #: Set while a destroy is pending: when the soft-delete window ends and the
    #: material is erased. Until then ``recover`` cancels it.
    purge_at: int | None = None
    revocation_reason: RevocationReason | None = None
    revocation_message: str | None = None

    # -- persistence: a JSON document beside the state column ----------------------------

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"usage": sorted(u.value for u in self.usage)}
        for name in (
            "activation",
            "protect_stop",
            "process_start",
            "deactivation",
            "compromise_date",
            "destroy_date",
            "purge_at",
            "revocation_message",
        ):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        if self.revocation_reason is not None:
            doc["revocation_reason"] = self.revocation_reason.value
        return doc

    @classmethod
    def from_json(
        cls,
        state: str,
        doc: dict[str, object],
        *,
        default_usage: frozenset[Usage],
        created_at: int,
    ) -> Lifecycle:
        """Rows from before lifecycles existed have ``{}``: active since creation."""

        def optional_int(name: str) -> int | None:
            value = doc.get(name)
            return None if value is None else int(value)  # type: ignore[call-overload]

        usage = doc.get("usage")
        reason = doc.get("revocation_reason")
        message = doc.get("revocation_message")
        return cls(
            state=State(state),
            usage=frozenset(Usage(u) for u in usage) if isinstance(usage, list) else default_usage,
            activation=optional_int("activation") if "usage" in doc else created_at,
            protect_stop=optional_int("protect_stop"),
            process_start=optional_int("process_start"),
            deactivation=optional_int("deactivation"),
            compromise_date=optional_int("compromise_date"),
            destroy_date=optional_int("destroy_date"),
            purge_at=optional_int("purge_at"),
            revocation_reason=None if reason is None else RevocationReason(reason),
            revocation_message=None if message is None else str(message),
        )

    # -- the state as of now, dates applied ----------------------------------------------

    def effective(self, now: float) -> State:
        """The state once the dates that passed are applied (KMIP's automatic transitions).

        A key scheduled for destruction is frozen in its state until then.
        """
        state = self.state
        if self.destroy_pending:
            return state
        if state is State.PRE_ACTIVE and self.activation is not None and now >= self.activation:
            state = State.ACTIVE
        if (
            state in (State.PRE_ACTIVE, State.ACTIVE)
            and self.deactivation is not None
            and now >= self.deactivation
        ):
            state = State.DEACTIVATED
        return state

    @property
    def destroy_pending(self) -> bool:
        return self.purge_at is not None and self.state not in DESTROYED_STATES

    def apply(self, event: Event, now: int, **changes: Any) -> Lifecycle:
        """The lifecycle after ``event``, or LifecycleError if the table does not allow it."""
        current = self.effective(now)
        target = TRANSITIONS.get((current, event))
        if target is None:
            raise LifecycleError(
                "wrong-state", f"cannot {event.value} a key that is {current.value}"
            )
        if event is Event.DESTROY:
            changes.setdefault("destroy_date", now)
            changes.setdefault("purge_at", None)
        if event is Event.ACTIVATE and (self.activation is None or self.activation > now):
            changes.setdefault("activation", now)
        if event is Event.DEACTIVATE and (self.deactivation is None or self.deactivation > now):
            changes.setdefault("deactivation", now)
        if event is Event.COMPROMISE:
            changes.setdefault("compromise_date", now)
        return attrs.evolve(self, state=target, **changes)

    def schedule_destroy(self, now: int, purge_at: int) -> Lifecycle:
        """Start the soft-delete window: the key refuses every use until recovered."""
        current = self.effective(now)
        if (current, Event.DESTROY) not in TRANSITIONS:
            raise LifecycleError("wrong-state", f"cannot destroy a key that is {current.value}")
        if self.destroy_pending:
            raise LifecycleError("destroy-pending", "the key is already scheduled for destruction")
        return attrs.evolve(self, purge_at=purge_at)

    def cancel_destroy(self) -> Lifecycle:
        if self.state in DESTROYED_STATES:
            raise LifecycleError(
                "destroyed", "the key was destroyed: its material is gone and cannot be recovered"
            )
        if not self.destroy_pending:
            raise LifecycleError("wrong-state", "the key is not scheduled for destruction")
        return attrs.evolve(self, purge_at=None)

    # -- may it be used now ----------------------------------------------------------------

    # The may_* predicates answer what the check_* methods allow, without building
    # an error or a message: the service asks them first on every get and calls
    # the check (for its error) only when they say no. test_lifecycle pins that the
    # two agree on every state, date and usage.

    def _active_at(self, now: float) -> bool:
        """effective(now) is ACTIVE and no destroy is pending."""
        state = self.state
        if state is not State.ACTIVE and not (
            state is State.PRE_ACTIVE and self.activation is not None and now >= self.activation
        ):
            return False
        return self.purge_at is None and (self.deactivation is None or now < self.deactivation)

    def may_protect(self, usage: Usage, now: float) -> bool:
        """Whether ``check_protect`` passes."""
        return (
            usage in self.usage
            and self._active_at(now)
            and (self.protect_stop is None or now < self.protect_stop)
        )

    def may_process(self, usage: Usage, now: float) -> bool:
        """Whether ``check_process`` passes."""
        return (
            usage in self.usage
            and self._active_at(now)
            and (self.process_start is None or now >= self.process_start)
        )

    def check_protect(self, usage: Usage, now: float, what: str) -> None:
        """For wrapping / encrypting: active, activated, before protect-stop."""
        self._check_usage(usage, what)
        state = self.effective(now)
        if state is not State.ACTIVE:
            raise _state_error(state, what)
        if self.protect_stop is not None and now >= self.protect_stop:
            raise LifecycleError(
                "protect-stop-passed",
                f"{what} is past its protect-stop date: it may no longer protect new data",
            )

    def check_process(self, usage: Usage, now: float, what: str) -> None:
        """For unwrapping / decrypting: active, after process-start, before deactivation."""
        self._check_usage(usage, what)
        state = self.effective(now)
        if state is not State.ACTIVE:
            raise _state_error(state, what)
        if self.process_start is not None and now < self.process_start:
            raise LifecycleError(
                "not-yet-active", f"{what} may not process data before its process-start date"
            )

    def check_recovery(self, usage: Usage, now: float, what: str) -> None:
        """Administrators rewrapping: also deactivated and compromised keys may unwrap."""
        self._check_usage(usage, what)
        state = self.effective(now)
        if state not in (State.ACTIVE, State.DEACTIVATED, State.COMPROMISED):
            raise _state_error(state, what)

    def _check_usage(self, usage: Usage, what: str) -> None:
        if self.destroy_pending:
            raise LifecycleError(
                "destroy-pending",
                f"{what} is scheduled for destruction at {self.purge_at}; recover it to use it",
            )
        if usage not in self.usage:
            allowed = ", ".join(sorted(u.value for u in self.usage))
            raise LifecycleError(
                "usage-not-permitted", f"{what} may only {allowed}, not {usage.value}"
            )


def _state_error(state: State, what: str) -> LifecycleError:
    if state is State.COMPROMISED:
        return LifecycleError("compromised", f"{what} is compromised")
    if state is State.PRE_ACTIVE:
        return LifecycleError("not-yet-active", f"{what} is not active yet")
    if state is State.DEACTIVATED:
        return LifecycleError("deactivated", f"{what} is deactivated")
    if state in DESTROYED_STATES:
        return LifecycleError("destroyed", f"{what} is destroyed")
    return LifecycleError("wrong-state", f"{what} is {state.value}")


# -- crypto-periods ------------------------------------------------------------------------

DAY = 86_400


@attrs.frozen
class CryptoPeriod:
    """How long a new key protects (originator usage) and processes (recipient usage).

    ``protect_days`` ends new wrapping/encryption; ``process_days`` (counted
    from activation too, at least as long) ends unwrapping/decryption.
    """

    namespaces: tuple[str, ...] = ("*",)
    protect_days: float | None = None
    process_days: float | None = None

    def matches(self, namespace: str) -> bool:
        return any(fnmatch.fnmatchcase(namespace, pattern) for pattern in self.namespaces)


@attrs.frozen
class LifecyclePolicy:
    kek_periods: tuple[CryptoPeriod, ...] = ()
    dek_periods: tuple[CryptoPeriod, ...] = ()
    #: Signing keys': protect_days is the private half's signing period, process_days
    #: how long signatures still verify.
    signing_periods: tuple[CryptoPeriod, ...] = ()
    #: Destroyed keys keep their material this long, so ``recover`` can undo a mistake.
    soft_delete_seconds: int = 7 * DAY
    #: Make the next KEK version when the newest reaches protect-stop.
    auto_rotate: bool = True
    #: The change feed (changes-since) keeps entries this long; a client further behind
    #: is told to drop every cached key.
    change_feed_seconds: int = 30 * DAY

    def new_lifecycle(
        self, kind: str, namespace: str, now: int, usage: frozenset[Usage], activation: int | None
    ) -> Lifecycle:
        """Dates computed at creation from the first matching crypto-period."""
        periods = {"kek": self.kek_periods, "signing-key": self.signing_periods}.get(
            kind, self.dek_periods
        )
        period = next((p for p in periods if p.matches(namespace)), CryptoPeriod())
        start = now if activation is None else activation
        state = State.ACTIVE if start <= now else State.PRE_ACTIVE
        return Lifecycle(
            state=state,
            usage=usage,
            activation=start,
            process_start=start,
            protect_stop=_after(start, period.protect_days),
            deactivation=_after(start, period.process_days),
        )


def _after(start: int, days: float | None) -> int | None:
    return None if days is None else start + int(days * DAY)
