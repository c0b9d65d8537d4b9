"""Key lifecycle after KMIP 2.1 and NIST SP 800-57: states, transitions, dates, usage, as data."""

from kmipd.lifecycle._model import (
    DAY,
    DEK_USAGES,
    DESTROYED_STATES,
    KEK_USAGES,
    SIGNING_USAGES,
    TRANSITIONS,
    CryptoPeriod,
    Event,
    Lifecycle,
    LifecycleError,
    LifecyclePolicy,
    RevocationReason,
    State,
    Usage,
    revocation_event,
)

__all__ = [
    "DAY",
    "DEK_USAGES",
    "DESTROYED_STATES",
    "KEK_USAGES",
    "SIGNING_USAGES",
    "TRANSITIONS",
    "CryptoPeriod",
    "Event",
    "Lifecycle",
    "LifecycleError",
    "LifecyclePolicy",
    "RevocationReason",
    "State",
    "Usage",
    "revocation_event",
]
