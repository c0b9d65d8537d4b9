"""Fuzzing with Hypothesis: messages shaped like the CDDL's requests but wrong in every way a
field can be wrong, arbitrary CBOR items, and arbitrary bytes in well-formed frames.

The invariant, for every example: the server answers within the timeout with
a documented response (a result only when the request is valid per the
CDDL, otherwise a documented error, echoing the id whenever the id was a
valid one), never closes the connection over a well-framed message, and a
sentinel client on its own connection keeps getting its DEK unchanged.
``--fuzz-examples`` sets the examples per case and ``--fuzz-seed`` the seed
(a random one is chosen and reported when not given). Shrinking is off, so
every case is bounded in count and time; the failing example is reported.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from conformance._case import CaseFailed, case
from conformance._connection import Connection, ConnectionClosed, NoResponse
from conformance._context import Context
from conformance._schema import Field, ValidatorCrashedError
from conformance._wire import describe, encode, frame, scan_item
from conformance.codec import WRONG_VALUES, category, valid_value

NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
SENTINEL_EVERY = 25
UINT64 = 2**64 - 1

_BOUNDARIES: dict[str, list[Any]] = {
    "text": [
        "",
        "a" * 128,
        "a" * 129,
        "../x",
        "/x",
        "x/",
        "x//y",
        "-x",
        ".x",
        "\x00",
        "é",
        " ",
        "a" * 5000,
    ],
    "bytes": [
        b"",
        b"\0" * 15,
        b"\0" * 16,
        b"\0" * 32,
        b"\0" * 33,
        b"\0" * 512,
        b"\0" * 1024,
        b"\0" * 1025,
    ],
    "uint": [0, 1, 65535, 65536, 2**32 - 1, 2**32, UINT64, -1, -(2**64)],
    "array": [[], [0], [1] * 16, [1] * 17, [65536], [65537], [-1], ["1"]],
    "map": [
        {},
        {"": ""},
        {"k": ""},
        {"k" * 129: "v"},
        {"k": "v" * 1025},
        {str(i): "" for i in range(33)},
    ],
    "bool": [True, False],
}


def _field_values(ctx: Context, field: Field) -> st.SearchStrategy[Any]:
    kind = category(field)
    generated: dict[str, st.SearchStrategy[Any]] = {
        "text": st.text(max_size=200),
        "bytes": st.binary(max_size=1100),
        "uint": st.integers(min_value=-(2**65), max_value=2**65),
        "array": st.lists(
            st.integers(min_value=-5, max_value=70_000) | st.text(max_size=3), max_size=20
        ),
        "bool": st.booleans(),
        "map": st.dictionaries(
            st.text(max_size=140), st.text(max_size=1100) | st.integers(), max_size=40
        ),
    }
    return st.one_of(
        st.just(valid_value(ctx, field)),
        st.sampled_from(WRONG_VALUES[kind]),
        st.sampled_from(_BOUNDARIES[kind]),
        generated[kind],
    )


def _valid_request(ctx: Context, payload: bytes) -> bool | None:
    """Whether the CDDL allows ``payload`` as a request; None when the validator
    crashed on it (then only what holds for every item is checked)."""
    try:
        return ctx.schema.validate("request", payload) is None
    except ValidatorCrashedError:
        return None


def _requests(ctx: Context) -> st.SearchStrategy[dict[str, Any]]:
    shapes = ctx.schema.requests
    ops = sorted(shapes)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        op = draw(st.sampled_from(ops) | st.text(max_size=24))
        message: dict[str, Any] = {"id": draw(st.integers(min_value=0, max_value=UINT64)), "op": op}
        shape = shapes.get(op)
        args: dict[str, Any] = {}
        for field in (shape.args or ()) if shape else ():
            if draw(st.integers(0, 4)):  # usually present, sometimes missing
                args[field.name] = draw(_field_values(ctx, field))
        if draw(st.integers(0, 9)) == 0:
            args[draw(st.text(min_size=1, max_size=16))] = draw(st.integers() | st.text(max_size=8))
        shape_of_args = draw(st.integers(0, 9))
        if shape_of_args == 0:
            pass  # no args at all
        elif shape_of_args == 1:
            message["args"] = draw(st.sampled_from([[], "args", 0, None, b""]))
        else:
            message["args"] = _contain(ctx, args)
        if draw(st.integers(0, 19)) == 0:
            message[draw(st.sampled_from(["identity", "extra", "ID", "args2"]))] = draw(
                st.text(max_size=8)
            )
        return message

    return build()


def _contain(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """Keep any namespace the fuzzer makes valid inside this run's own namespace."""
    contained = dict(args)
    for name in ("namespace", "kek", "name"):
        value = args.get(name)
        if isinstance(value, str) and NAMESPACE.fullmatch(value):
            contained[name] = ctx.run.namespace("fuzz/" + value)
    return contained


def _cbor_items() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**66), max_value=2**66)
        | st.floats(allow_nan=True)
        | st.text(max_size=40)
        | st.binary(max_size=40)
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=6)
            | st.dictionaries(st.text(max_size=12) | st.integers(), children, max_size=6)
        ),
        max_leaves=40,
    )


class _Fuzzer:
    """One connection for the examples, reopened if the server (wrongly) closes it."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.connection: Connection | None = None
        self.sentinel = ctx.connect(label="sentinel")
        self.examples = 0

    def send(self, payload: bytes, what: str) -> Any:
        ctx = self.ctx
        if self.connection is None:
            self.connection = ctx.connect(label=f"fuzz{self.examples}")
        self.examples += 1
        self.connection.send_raw(frame(payload), what)
        try:
            reply = self.connection.receive(ctx.options.timeout)
        except NoResponse:
            raise CaseFailed(f"no answer within {ctx.options.timeout:g} s to {what}") from None
        except ConnectionClosed as exc:
            self.connection = None
            raise CaseFailed(
                f"the server closed the connection over a well-framed message ({exc}): {what}"
            ) from None
        if self.examples % SENTINEL_EVERY == 0:
            self.check_sentinel()
        return reply

    def check_sentinel(self) -> None:
        assert self.ctx.run.baseline is not None
        dek_id, key = self.ctx.run.baseline
        got = self.ctx.expect_result(
            self.ctx.request(self.sentinel, "get-dek", {"dek-id": dek_id}), "dek-result"
        )
        self.ctx.expect(got["key"] == key, "the sentinel client got a different key for its DEK")

    def close(self) -> None:
        self.check_sentinel()
        self.sentinel.close()
        if self.connection is not None:
            self.connection.close()


def _run_hypothesis(
    ctx: Context, strategy: st.SearchStrategy[Any], check: Callable[[_Fuzzer, Any], None]
) -> None:
    chosen_seed = (
        ctx.options.fuzz_seed if ctx.options.fuzz_seed is not None else random.getrandbits(32)
    )
    ctx.measurements.update(seed=chosen_seed, examples=ctx.options.fuzz_examples)
    fuzzer = _Fuzzer(ctx)

    @seed(chosen_seed)
    @settings(
        max_examples=ctx.options.fuzz_examples,
        database=None,
        deadline=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(strategy)
    def run_examples(example: Any) -> None:
        check(fuzzer, example)

    try:
        run_examples()
    except CaseFailed as exc:
        notes = [n for n in getattr(exc, "__notes__", []) if "Falsifying" not in n]
        raise CaseFailed(
            f"{exc} (seed {chosen_seed}; rerun with --fuzz-seed {chosen_seed})"
            + ("; " + "; ".join(notes) if notes else "")
        ) from None
    finally:
        fuzzer.close()
    ctx.note(f"{fuzzer.examples} examples, seed {chosen_seed}")


@case(
    "FUZZ-001",
    "Requests generated from the CDDL's request rules with wrong, missing, extra, boundary and "
    "random field values get a documented answer: a result only when valid per the CDDL, the "
    "id always echoed, the connection kept, other clients unaffected.",
    hostile=True,
)
def fuzz_requests(ctx: Context) -> None:
    def check(fuzzer: _Fuzzer, message: dict[str, Any]) -> None:
        payload = encode(message)
        valid = _valid_request(ctx, payload)
        verdict = {True: "valid", False: "invalid", None: "unjudged"}[valid]
        reply = fuzzer.send(payload, f"{verdict} {describe(message)}")
        # A frame outside the CBOR profile (e.g. a bignum's tag) does not decode: no id to echo.
        in_profile = not scan_item(payload).profile_violations
        if reply.id != message["id"] and (in_profile or reply.id is not None):
            raise CaseFailed(f"the answer to {describe(message)} carries id {reply.id}")
        if valid is False and not reply.is_error:
            raise CaseFailed(f"a request the CDDL forbids was served: {describe(message)}")

    _run_hypothesis(ctx, _requests(ctx), check)


@case(
    "FUZZ-002",
    "Arbitrary CBOR items (floats, big integers, nested maps with any keys), alone or as a "
    "request's args, get an error (or a result if they happen to be a valid request), "
    "never a close or a hang.",
    hostile=True,
)
def fuzz_cbor_items(ctx: Context) -> None:
    def check(fuzzer: _Fuzzer, example: tuple[bool, Any]) -> None:
        as_args, item = example
        message = {"id": 7, "op": "status", "args": item} if as_args else item
        payload = encode(message)
        valid = _valid_request(ctx, payload)
        reply = fuzzer.send(payload, describe(message))
        if valid is False and not reply.is_error:
            raise CaseFailed(f"an item the CDDL forbids was served: {describe(message)}")

    _run_hypothesis(ctx, st.tuples(st.booleans(), _cbor_items()), check)


@case(
    "FUZZ-003",
    "Arbitrary bytes in well-formed frames get an error response (never a result, a close "
    "or a hang).",
    hostile=True,
)
def fuzz_bytes(ctx: Context) -> None:
    def check(fuzzer: _Fuzzer, payload: bytes) -> None:
        reply = fuzzer.send(payload, f"{len(payload)} random bytes")
        if not reply.is_error and _valid_request(ctx, payload) is False:
            raise CaseFailed(f"random bytes were served as a request: {payload[:32].hex(' ')}")

    _run_hypothesis(ctx, st.binary(min_size=0, max_size=2048), check)
