"""Cases, verdicts and the registry every group module adds its cases to.

A case is a function of the run's context with a stable id (``FRAME-004``)
and one sentence saying what it checks; CASES.md is generated from these.
A case passes by returning, fails by raising ``CaseFailed`` (with what was
sent and what came back), and skips by raising ``CaseSkipped`` (with why).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from conformance._context import Context

#: Group names in report order, with the id prefix of their cases.
GROUPS: dict[str, str] = {
    "tls": "TLS",
    "sslyze": "SSLYZE",
    "framing": "FRAME",
    "codec": "CODEC",
    "protocol": "PROTO",
    "authz": "AUTHZ",
    "liveness": "LIVE",
    "fuzz": "FUZZ",
    "kmip": "KMIP",
}
_PREFIX_TO_GROUP = {prefix: group for group, prefix in GROUPS.items()}
_CASE_ID = re.compile(r"([A-Z]+)-(\d{3})")


class Verdict(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    #: A measurement reported for people to read; never fails a run.
    INFO = "info"


class CaseFailed(Exception):  # noqa: N818 (a verdict, not an error of the suite)
    """The server did something the protocol does not allow."""


class CaseSkipped(Exception):  # noqa: N818 (a verdict, not an error of the suite)
    """The case cannot run against this target; the message says what it needs."""


class Informational(Exception):  # noqa: N818 (not an error: the case's outcome is a measurement)
    """The case measured something to report, without a pass/fail verdict."""


class When(enum.Enum):
    """When the runner starts a case."""

    #: In id order, one after another.
    IN_ORDER = "in-order"
    #: At the start, in a thread of its own, because it mostly waits (a server timeout).
    BACKGROUND = "background"
    #: After every other case: it stops the server (self-test only).
    LAST = "last"


@attrs.frozen
class Case:
    id: str
    title: str
    run: Callable[[Context], None] = attrs.field(repr=False)
    #: Sends hostile input: afterwards a fresh client must still be served correctly.
    hostile: bool = False
    when: When = When.IN_ORDER

    @property
    def group(self) -> str:
        return _PREFIX_TO_GROUP[self.id.split("-")[0]]

    @property
    def sort_key(self) -> tuple[int, int]:
        prefix, number = self.id.split("-")
        return list(GROUPS.values()).index(prefix), int(number)


@attrs.define
class Result:
    case: Case
    verdict: Verdict
    #: Why it failed or skipped, or what was measured.
    detail: str = ""
    #: Lines showing what was sent and received (failures only).
    evidence: list[str] = attrs.field(factory=list)
    #: Numbers a case measured (the informational cases, timings).
    measurements: dict[str, Any] = attrs.field(factory=dict)
    seconds: float = 0.0


_REGISTRY: dict[str, Case] = {}


def case(
    case_id: str, title: str, *, hostile: bool = False, when: When = When.IN_ORDER
) -> Callable[[Callable[[Context], None]], Callable[[Context], None]]:
    """Register the decorated function as a case; ids are unique and never reused."""
    match = _CASE_ID.fullmatch(case_id)
    if match is None or match.group(1) not in _PREFIX_TO_GROUP:
        raise ValueError(f"bad case id {case_id!r}: expected one of {list(GROUPS.values())}-NNN")
    if not title.endswith("."):
        raise ValueError(f"{case_id}: the title is one sentence ending with a full stop")

    def register(function: Callable[[Context], None]) -> Callable[[Context], None]:
        if case_id in _REGISTRY:
            raise ValueError(f"case id {case_id} registered twice")
        _REGISTRY[case_id] = Case(case_id, title, function, hostile=hostile, when=when)
        return function

    return register


def all_cases() -> list[Case]:
    """Every registered case, in report order (group, then number)."""
    # Importing the groups registers their cases.
    from conformance import (  # noqa: F401, PLC0415
        authz,
        codec,
        framing,
        fuzz,
        kmip,
        liveness,
        protocol,
        sslyze,
        tls,
    )

    return sorted(_REGISTRY.values(), key=lambda c: c.sort_key)


def select_cases(cases: list[Case], only: list[str]) -> list[Case]:
    """Cases matching any of ``only``: a group name, an id prefix, or a case id."""
    if not only:
        return cases
    wanted: set[str] = set()
    for name in only:
        key = name.strip()
        matches = [
            c
            for c in cases
            if key.lower() == c.group or key.upper() == c.id.split("-")[0] or key.upper() == c.id
        ]
        if not matches:
            known = ", ".join(GROUPS)
            raise ValueError(f"--only {key!r} matches no case (groups: {known}; or a case id)")
        wanted.update(c.id for c in matches)
    return [c for c in cases if c.id in wanted]
