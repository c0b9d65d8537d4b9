"""Key lifecycle: the state table, dates at their boundaries, rotation, rewrap, destroy."""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmipd.audit import AuditLog
from kmipd.audit import records as audit_records
from kmipd.client import Client
from kmipd.hsm import SoftwareHsm
from kmipd.lifecycle import (
    DAY,
    DEK_USAGES,
    KEK_USAGES,
    TRANSITIONS,
    CryptoPeriod,
    Event,
    Lifecycle,
    LifecycleError,
    LifecyclePolicy,
    State,
    Usage,
)
from kmipd.protocol import (
    Activate,
    ChangesSince,
    CreateDek,
    CreateKek,
    Dependents,
    Destroy,
    ErrorCode,
    GenerateDataKey,
    GetAttributes,
    GetDek,
    KeyRef,
    Locate,
    ProtocolError,
    Recover,
    Revoke,
    RewrapBlob,
    RewrapDek,
    RotateKek,
    StartRewrap,
    Unwrap,
    parse_request,
)
from kmipd.service import NOT_NOW, Caller, KeyService, ServiceError
from kmipd.store import KeyStore
from kmipd.store._sqlite import MIGRATIONS
from tests.conftest import StoreOpener, make_policy
from tests.processes import Daemon, run_kmipd

STORAGE = Caller("spiffe://kmipd.test/storage", 1)
ADMIN = Caller("spiffe://kmipd.test/admin", 2)
T0 = 1_800_000_000


class Clock:
    def __init__(self) -> None:
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now


def open_sqlite(data: Path, **options: Any) -> KeyStore:
    return KeyStore.open(data / "kmipd.db", **options)


class Harness:
    def __init__(
        self,
        data: Path,
        policy: LifecyclePolicy,
        clock: Clock,
        open_store: StoreOpener = open_sqlite,
    ) -> None:
        self.data, self.clock = data, clock
        self.audit = AuditLog.open(data / "audit.log", data / "audit.key")
        self.service = KeyService(
            store=open_store(data, clock=clock),
            hsm=SoftwareHsm.open(data / "master.key", data / "keyring.cbor", create=True),
            policy=make_policy(),
            clock=clock,
            create_kek_on_demand=False,
            lifecycle=policy,
            audit=self.audit,
        )

    async def ok(self, caller: Caller, request: Any) -> Any:
        return await self.service.handle(caller, request)

    async def refused(self, caller: Caller, request: Any) -> ServiceError:
        with pytest.raises(ServiceError) as caught:
            await self.service.handle(caller, request)
        return caught.value

    def close(self) -> None:
        self.service.store.close()
        self.service.hsm.close()
        self.audit.close()


PERIODS = LifecyclePolicy(
    kek_periods=(CryptoPeriod(("orders*",), protect_days=10, process_days=20),),
    soft_delete_seconds=DAY,
    auto_rotate=False,
)


@pytest.fixture
async def kms(tmp_path: Path, open_store: StoreOpener) -> AsyncIterator[Harness]:
    """On each store backend (conftest's open_store)."""
    harness = Harness(tmp_path, PERIODS, Clock(), open_store)
    await harness.ok(ADMIN, CreateKek(name="orders"))
    yield harness
    harness.close()


@pytest.fixture
async def sqlite_kms(tmp_path: Path) -> AsyncIterator[Harness]:
    """For the tests that read the SQLite files themselves."""
    harness = Harness(tmp_path, PERIODS, Clock())
    await harness.ok(ADMIN, CreateKek(name="orders"))
    yield harness
    harness.close()


# -- the transition table ----------------------------------------------------------------


@given(st.sampled_from(list(State)), st.sampled_from(list(Event)))
def test_every_state_event_pair_follows_the_table(state: State, event: Event) -> None:
    # No dates: the stored state is the effective state.
    lifecycle = Lifecycle(state=state, usage=KEK_USAGES)
    expected = TRANSITIONS.get((state, event))
    if expected is None:
        with pytest.raises(LifecycleError) as caught:
            lifecycle.apply(event, 100)
        assert caught.value.reason == "wrong-state"
    else:
        assert lifecycle.apply(event, 100).state is expected


@given(st.lists(st.sampled_from(list(Event)), max_size=12))
def test_no_event_sequence_revives_a_compromised_or_destroyed_key(events: list[Event]) -> None:
    lifecycle = Lifecycle(state=State.PRE_ACTIVE, usage=DEK_USAGES, activation=10**12)
    seen_compromise = False
    for event in events:
        try:
            lifecycle = lifecycle.apply(event, 100)
        except LifecycleError:
            continue
        if lifecycle.state in (State.COMPROMISED, State.DESTROYED_COMPROMISED):
            seen_compromise = True
        if seen_compromise:
            assert lifecycle.state in (State.COMPROMISED, State.DESTROYED_COMPROMISED)
        if lifecycle.state in (State.DESTROYED, State.DESTROYED_COMPROMISED):
            assert lifecycle.destroy_date == 100


def test_the_quick_predicates_agree_with_the_checks() -> None:
    # The service asks may_* first on every get and calls check_* only when they say
    # no: they must allow exactly what the checks allow. Every state, with and
    # without the usage, every date unset or one second before, at or after now.
    dates = (None, 99, 100, 101)
    checked = 0
    for state, usage, activation, protect_stop, process_start, deactivation, purge_at in (
        itertools.product(
            State, (DEK_USAGES, frozenset({Usage.ENCRYPT})), dates, dates, dates, dates, dates
        )
    ):  # fmt: skip
        lifecycle = Lifecycle(
            state=state,
            usage=usage,
            activation=activation,
            protect_stop=protect_stop,
            process_start=process_start,
            deactivation=deactivation,
            purge_at=purge_at,
        )
        for now in (100, 100.5, 99.5):
            for may, check in (
                (lifecycle.may_protect, lifecycle.check_protect),
                (lifecycle.may_process, lifecycle.check_process),
            ):
                try:
                    check(Usage.DECRYPT, now, "the key")
                except LifecycleError:
                    allowed = False
                else:
                    allowed = True
                assert may(Usage.DECRYPT, now) is allowed, (lifecycle, now)
                checked += allowed
    assert checked > 0  # some combinations are allowed, not only refusals


def test_table_has_kmip_transitions_and_no_others() -> None:
    assert len(TRANSITIONS) == 10
    assert (State.ACTIVE, Event.DESTROY) not in TRANSITIONS  # revoke first, as KMIP says
    assert (State.COMPROMISED, Event.ACTIVATE) not in TRANSITIONS


# -- dates, one second before and after ------------------------------------------------------


async def test_protect_stop_ends_wrapping_but_not_unwrapping(kms: Harness) -> None:
    dek = await kms.ok(STORAGE, CreateDek(namespace="orders"))
    data_key = await kms.ok(STORAGE, GenerateDataKey(kek="orders"))
    kms.clock.now = T0 + 10 * DAY - 1  # a second before protect-stop
    await kms.ok(STORAGE, CreateDek(namespace="orders"))
    kms.clock.now = T0 + 10 * DAY  # protect-stop reached
    error = await kms.refused(STORAGE, CreateDek(namespace="orders"))
    assert error.code is ErrorCode.PROTECT_STOP_PASSED
    assert (await kms.refused(STORAGE, GenerateDataKey(kek="orders"))).code is (
        ErrorCode.PROTECT_STOP_PASSED
    )
    assert (await kms.ok(STORAGE, GetDek(dek_id=dek.dek_id))).key == dek.key
    assert (await kms.ok(STORAGE, Unwrap(blob=data_key.blob))).key == data_key.key
    kms.clock.now = T0 + 20 * DAY - 1  # a second before deactivation: still reads
    assert (await kms.ok(STORAGE, GetDek(dek_id=dek.dek_id))).key == dek.key
    kms.clock.now = T0 + 20 * DAY  # deactivated
    assert (await kms.refused(STORAGE, GetDek(dek_id=dek.dek_id))).code is (
        ErrorCode.KEY_DEACTIVATED
    )
    assert (await kms.refused(STORAGE, Unwrap(blob=data_key.blob))).code is (
        ErrorCode.KEY_DEACTIVATED
    )


async def test_a_future_activation_date_makes_a_pre_active_kek(kms: Harness) -> None:
    await kms.ok(ADMIN, CreateKek(name="later", activation=T0 + 100))
    kms.clock.now = T0 + 99
    error = await kms.refused(STORAGE, CreateDek(namespace="later"))
    assert error.code is ErrorCode.KEY_NOT_ACTIVE
    kms.clock.now = T0 + 100
    assert len((await kms.ok(STORAGE, CreateDek(namespace="later"))).key) == 32
    past = await kms.refused(ADMIN, CreateKek(name="past", activation=T0))
    assert past.code is ErrorCode.BAD_REQUEST
    assert "in the past" in past.message


async def test_activate_brings_a_pre_active_kek_forward(kms: Harness) -> None:
    await kms.ok(ADMIN, CreateKek(name="soon", activation=T0 + 3600))
    attributes = await kms.ok(ADMIN, Activate(key=KeyRef(kek="soon", version=1)))
    assert attributes.state == "active"
    assert attributes.activation == T0
    await kms.ok(STORAGE, CreateDek(namespace="soon"))


# -- single purpose ---------------------------------------------------------------------------


async def test_usage_outside_the_set_is_refused(kms: Harness) -> None:
    await kms.ok(ADMIN, CreateKek(name="legacy", usage=("unwrap",)))
    error = await kms.refused(STORAGE, CreateDek(namespace="legacy"))
    assert error.code is ErrorCode.USAGE_NOT_PERMITTED
    assert "may only unwrap, not wrap" in error.message
    read_only = await kms.ok(STORAGE, CreateDek(namespace="orders", usage=("decrypt",)))
    refused = await kms.refused(STORAGE, GetDek(dek_id=read_only.dek_id, purpose="encrypt"))
    assert refused.code is ErrorCode.USAGE_NOT_PERMITTED
    await kms.ok(STORAGE, GetDek(dek_id=read_only.dek_id, purpose="decrypt"))


async def _awaited_and_inline(kms: Harness, caller: Caller, request: GetDek) -> list[Any]:
    """get-dek through handle and through handle_now (the cached row, inline): each
    one's key or (code, message), and the result and detail its audit record says."""
    answers: list[Any] = []
    for inline in (False, True):
        try:
            if inline:
                result = kms.service.handle_now(caller, request)
                assert result is not NOT_NOW  # the row is cached: answered inline
            else:
                result = await kms.service.handle(caller, request)
            answer: Any = result.key
        except ServiceError as exc:
            answer = (exc.code, exc.message)
        *_, (_, record) = audit_records(kms.data / "audit.log")
        answers.append((answer, record["result"], record.get("detail")))
    return answers


async def test_the_inline_get_dek_answers_and_refuses_as_the_awaited_one(kms: Harness) -> None:
    dek = await kms.ok(STORAGE, CreateDek(namespace="orders"))
    read_only = await kms.ok(STORAGE, CreateDek(namespace="orders", usage=("decrypt",)))
    compromised = await kms.ok(STORAGE, CreateDek(namespace="orders"))
    await kms.ok(ADMIN, Revoke(key=KeyRef(dek_id=compromised.dek_id), reason="key-compromise"))
    gone = compromised.dek_id
    cases = [
        (STORAGE, GetDek(dek_id=dek.dek_id), dek.key),
        (STORAGE, GetDek(dek_id=dek.dek_id, purpose="encrypt"), dek.key),
        (
            STORAGE,
            GetDek(dek_id=read_only.dek_id, purpose="encrypt"),
            ErrorCode.USAGE_NOT_PERMITTED,
        ),
        (STORAGE, GetDek(dek_id=gone), ErrorCode.KEY_COMPROMISED),
        (STORAGE, GetDek(dek_id=gone, purpose="recovery"), ErrorCode.NOT_AUTHORIZED),
        (ADMIN, GetDek(dek_id=gone, purpose="recovery"), compromised.key),
    ]
    for caller, request, expected in cases:
        awaited, inline = await _awaited_and_inline(kms, caller, request)
        assert awaited == inline, request
        answer = awaited[0]
        assert (answer[0] if isinstance(answer, tuple) else answer) == expected, request
    # Past the KEK version's process period (20 days): its DEKs no longer unwrap, either way.
    kms.clock.now += 21 * DAY
    awaited, inline = await _awaited_and_inline(kms, STORAGE, GetDek(dek_id=dek.dek_id))
    assert awaited == inline
    assert awaited[0][0] is ErrorCode.KEY_DEACTIVATED and "KEK 'orders'" in awaited[0][1]
    assert awaited[1] == "key-deactivated"


# -- rotation and rewrap ------------------------------------------------------------------------


async def test_rotation_new_wraps_use_new_version_old_deks_still_read(kms: Harness) -> None:
    before = await kms.ok(STORAGE, CreateDek(namespace="orders"))
    rotated = await kms.ok(ADMIN, RotateKek(name="orders"))
    assert rotated.version == 2
    after = await kms.ok(STORAGE, CreateDek(namespace="orders"))
    assert (before.kek_version, after.kek_version) == (1, 2)
    assert (await kms.ok(STORAGE, GetDek(dek_id=before.dek_id))).key == before.key
    dependents = await kms.ok(ADMIN, Dependents(kek="orders", version=1))
    assert (dependents.count, dependents.dek_ids) == (1, (before.dek_id,))
    rewrapped = await kms.ok(ADMIN, RewrapDek(dek_id=before.dek_id))
    assert rewrapped.version == 2
    assert (await kms.ok(STORAGE, GetDek(dek_id=before.dek_id))).key == before.key
    assert (await kms.ok(ADMIN, Dependents(kek="orders", version=1))).count == 0


async def test_automatic_rotation_at_protect_stop(tmp_path: Path, open_store: StoreOpener) -> None:
    policy = LifecyclePolicy(kek_periods=PERIODS.kek_periods, auto_rotate=True)
    harness = Harness(tmp_path, policy, Clock(), open_store)
    await harness.ok(ADMIN, CreateKek(name="orders"))
    first = await harness.ok(STORAGE, CreateDek(namespace="orders"))
    harness.clock.now = T0 + 10 * DAY  # the version stops protecting: a new one is made
    second = await harness.ok(STORAGE, CreateDek(namespace="orders"))
    assert (first.kek_version, second.kek_version) == (1, 2)
    harness.clock.now = T0 + 20 * DAY + 5  # v2 also expired: maintenance rotates by itself
    await harness.service.maintain()
    kek = harness.service.store.get_kek("orders")
    assert kek is not None
    assert [v.version for v in kek.versions] == [1, 2, 3]
    assert kek.versions[0].lifecycle.state is State.DEACTIVATED  # its date was recorded
    harness.close()


async def test_rewrap_blob_moves_a_stateless_key_to_the_newest_version(kms: Harness) -> None:
    made = await kms.ok(STORAGE, GenerateDataKey(kek="orders", context={"v": "1"}))
    await kms.ok(ADMIN, RotateKek(name="orders"))
    moved = await kms.ok(STORAGE, RewrapBlob(blob=made.blob, context={"v": "1"}))
    assert moved.kek_version == 2
    assert moved.blob != made.blob
    assert (await kms.ok(STORAGE, Unwrap(blob=moved.blob, context={"v": "1"}))).key == made.key
    wrong = await kms.refused(STORAGE, RewrapBlob(blob=made.blob, context={"v": "2"}))
    assert wrong.code is ErrorCode.INTEGRITY_FAILURE


async def test_rewrap_job_moves_a_namespace_in_batches(kms: Harness) -> None:
    deks = [await kms.ok(STORAGE, CreateDek(namespace="orders")) for _ in range(23)]
    await kms.ok(ADMIN, RotateKek(name="orders"))
    job = await kms.ok(ADMIN, StartRewrap(namespace="orders"))
    assert (job.state, job.remaining, job.target_version) == ("running", 23, 2)
    stored = await kms.service.store.get_job(job.job_id)
    assert stored is not None
    batches = 0
    while stored.state == "running":
        stored = await kms.service.run_rewrap_batch(stored, 5)
        batches += 1
    assert (stored.rewrapped, stored.remaining, batches) == (23, 0, 5)
    for dek in deks:
        again = await kms.ok(STORAGE, GetDek(dek_id=dek.dek_id))
        assert (again.kek_version, again.key) == (2, dek.key)


# -- revocation, destruction, recovery ---------------------------------------------------------


async def test_compromised_dek_stops_serving_except_to_recovery(kms: Harness) -> None:
    dek = await kms.ok(STORAGE, CreateDek(namespace="orders"))
    revoked = await kms.ok(
        ADMIN,
        Revoke(key=KeyRef(dek_id=dek.dek_id), reason="key-compromise", message="laptop stolen"),
    )
    assert revoked.state == "compromised"
    assert revoked.revocation_reason == "key-compromise"
    assert (await kms.refused(STORAGE, GetDek(dek_id=dek.dek_id))).code is (
        ErrorCode.KEY_COMPROMISED
    )
    denied = await kms.refused(STORAGE, GetDek(dek_id=dek.dek_id, purpose="recovery"))
    assert denied.code is ErrorCode.NOT_AUTHORIZED  # recovery is an admin grant
    assert (await kms.ok(ADMIN, GetDek(dek_id=dek.dek_id, purpose="recovery"))).key == dek.key


async def test_compromised_kek_version_only_unwraps_for_rewrap(kms: Harness) -> None:
    dek = await kms.ok(STORAGE, CreateDek(namespace="orders"))
    await kms.ok(ADMIN, RotateKek(name="orders"))
    await kms.ok(ADMIN, Revoke(key=KeyRef(kek="orders", version=1), reason="key-compromise"))
    assert (await kms.refused(STORAGE, GetDek(dek_id=dek.dek_id))).code is (
        ErrorCode.KEY_COMPROMISED
    )
    await kms.ok(ADMIN, RewrapDek(dek_id=dek.dek_id))  # recovery: onto version 2
    assert (await kms.ok(STORAGE, GetDek(dek_id=dek.dek_id))).key == dek.key


async def test_revoke_needs_a_known_reason(kms: Harness) -> None:
    with pytest.raises(ProtocolError, match="missing required field 'reason'"):
        parse_request({"id": 1, "op": "revoke", "args": {"key": {"kek": "orders", "version": 1}}})
    with pytest.raises(ProtocolError, match="not a valid revocation reason"):
        parse_request(
            {
                "id": 1,
                "op": "revoke",
                "args": {"key": {"kek": "orders", "version": 1}, "reason": "bored"},
            }
        )
    with pytest.raises(ProtocolError, match="not a valid state"):
        parse_request({"id": 1, "op": "locate", "args": {"state": "sleepy"}})
    ambiguous = await kms.refused(ADMIN, Revoke(key=KeyRef(kek="orders"), reason="superseded"))
    assert ambiguous.code is ErrorCode.BAD_REQUEST


async def test_destroy_soft_delete_recover_then_purge_for_good(sqlite_kms: Harness) -> None:
    kms = sqlite_kms
    dek = await kms.ok(STORAGE, CreateDek(namespace="orders"))
    ref = KeyRef(dek_id=dek.dek_id)
    active = await kms.refused(ADMIN, Destroy(key=ref))
    assert active.code is ErrorCode.WRONG_STATE  # revoke first
    await kms.ok(ADMIN, Revoke(key=ref, reason="cessation-of-operation"))
    pending = await kms.ok(ADMIN, Destroy(key=ref))
    assert (pending.state, pending.purge_at) == ("deactivated", T0 + DAY)  # not destroyed yet
    refused = await kms.refused(ADMIN, GetDek(dek_id=dek.dek_id, purpose="recovery"))
    assert refused.code is ErrorCode.DESTROY_PENDING  # but no longer usable
    recovered = await kms.ok(ADMIN, Recover(key=ref))
    assert (recovered.state, recovered.purge_at) == ("deactivated", None)
    assert (await kms.ok(ADMIN, GetDek(dek_id=dek.dek_id, purpose="recovery"))).key == dek.key
    await kms.ok(ADMIN, Destroy(key=ref))
    kms.clock.now = T0 + DAY - 1
    assert await kms.service.purge_due() == 0
    kms.clock.now = T0 + DAY  # the soft-delete window ends
    assert await kms.service.purge_due() == 1
    gone = await kms.refused(ADMIN, Recover(key=ref))
    assert gone.code is ErrorCode.KEY_DESTROYED
    destroyed = await kms.ok(ADMIN, GetAttributes(key=ref))
    assert (destroyed.state, destroyed.destroy_date) == ("destroyed", T0 + DAY)
    kms.service.store.close()
    on_disk = b"".join(p.read_bytes() for p in kms.data.glob("kmipd.db*"))
    assert dek.key not in on_disk
    with sqlite3.connect(kms.data / "kmipd.db") as db:
        (wrapped,) = db.execute("SELECT wrapped FROM deks WHERE id = ?", (dek.dek_id,)).fetchone()
    assert wrapped == b""
    kms.service.store = KeyStore.open(kms.data / "kmipd.db")


async def test_purge_removes_the_wrapped_bytes_from_the_database_file(sqlite_kms: Harness) -> None:
    kms = sqlite_kms
    dek = await kms.ok(STORAGE, CreateDek(namespace="orders"))
    record = await kms.service.store.get_dek(dek.dek_id)
    assert record is not None
    wrapped = record.wrapped
    await kms.service.store.checkpoint()
    assert wrapped in (kms.data / "kmipd.db").read_bytes()  # the check can see it
    await kms.ok(ADMIN, Revoke(key=KeyRef(dek_id=dek.dek_id), reason="superseded"))
    await kms.ok(ADMIN, Destroy(key=KeyRef(dek_id=dek.dek_id), purge_now=True))
    files = [p for p in kms.data.glob("kmipd.db*") if p.is_file()]
    assert all(wrapped not in p.read_bytes() for p in files)


async def test_kek_version_with_dependents_needs_force(kms: Harness) -> None:
    dek = await kms.ok(STORAGE, CreateDek(namespace="orders"))
    ref = KeyRef(kek="orders", version=1)
    await kms.ok(ADMIN, RotateKek(name="orders"))
    await kms.ok(ADMIN, Revoke(key=ref, reason="superseded"))
    refused = await kms.refused(ADMIN, Destroy(key=ref))
    assert refused.code is ErrorCode.DEPENDENTS_EXIST
    assert dek.dek_id in refused.message
    await kms.ok(ADMIN, Destroy(key=ref, force=True, purge_now=True))
    lost = await kms.refused(STORAGE, GetDek(dek_id=dek.dek_id))
    assert lost.code is ErrorCode.KEY_DESTROYED  # crypto-shredded with its KEK version
    assert (await kms.ok(STORAGE, CreateDek(namespace="orders"))).kek_version == 2


async def test_locate_and_the_change_feed(kms: Harness) -> None:
    deks = [await kms.ok(STORAGE, CreateDek(namespace="orders")) for _ in range(3)]
    start = (await kms.ok(STORAGE, ChangesSince(seq=2**62))).seq
    await kms.ok(ADMIN, Revoke(key=KeyRef(dek_id=deks[0].dek_id), reason="superseded"))
    found = await kms.ok(ADMIN, Locate(kind="dek", state="deactivated"))
    assert [k.dek_id for k in found.keys] == [deks[0].dek_id]
    everything = await kms.ok(ADMIN, Locate(kind="dek", limit=2))
    assert len(everything.keys) == 2
    assert everything.next is not None
    rest = await kms.ok(ADMIN, Locate(kind="dek", after=everything.next))
    assert len(rest.keys) == 1
    feed = await kms.ok(STORAGE, ChangesSince(seq=start))
    assert [(c.dek_id, c.state) for c in feed.changes] == [(deks[0].dek_id, "deactivated")]


async def test_the_change_feed_is_pruned_and_a_reader_behind_it_is_told(kms: Harness) -> None:
    deks = [await kms.ok(STORAGE, CreateDek(namespace="orders")) for _ in range(3)]
    kms.clock.now += 21 * DAY  # past the orders KEK's deactivation: its change comes first
    await kms.service.maintain()
    start = (await kms.ok(STORAGE, ChangesSince(seq=2**62))).seq
    for dek in deks[:2]:
        await kms.ok(ADMIN, Revoke(key=KeyRef(dek_id=dek.dek_id), reason="key-compromise"))
        kms.clock.now += 10
    caught_up = (await kms.ok(STORAGE, ChangesSince(seq=start))).seq
    assert caught_up == start + 2
    kms.clock.now += PERIODS.change_feed_seconds - 20  # the first revocation is exactly
    await kms.service.maintain()  # as old as the retention: it stays
    assert len((await kms.ok(STORAGE, ChangesSince(seq=start))).changes) == 2
    kms.clock.now += 1
    await kms.service.maintain()  # a second older than the retention: it goes
    behind = await kms.ok(STORAGE, ChangesSince(seq=start))
    assert behind.reset is True  # it missed a change that is gone
    assert behind.seq == caught_up
    assert [c.dek_id for c in behind.changes] == [deks[1].dek_id]
    current = await kms.ok(STORAGE, ChangesSince(seq=caught_up))
    assert current.reset is None and current.changes == ()
    kms.clock.now += DAY * 365
    await kms.service.maintain()  # everything is old: the newest entry still stays
    assert (await kms.ok(STORAGE, ChangesSince(seq=2**62))).seq == caught_up
    await kms.ok(ADMIN, Revoke(key=KeyRef(dek_id=deks[2].dek_id), reason="key-compromise"))
    after = await kms.ok(STORAGE, ChangesSince(seq=caught_up))  # numbering goes on
    assert [c.dek_id for c in after.changes] == [deks[2].dek_id]
    assert after.seq == caught_up + 1 and after.reset is None


async def test_a_store_from_before_lifecycles_upgrades(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "kmipd.db") as db:
        db.executescript(MIGRATIONS[0])
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO keks VALUES ('old', 5, 'someone')")
        db.execute("INSERT INTO kek_versions VALUES ('old', 1, 'soft-x', 5)")
    store = KeyStore.open(tmp_path / "kmipd.db")
    kek = store.get_kek("old")
    assert kek is not None
    assert kek.latest.lifecycle.state is State.ACTIVE
    assert kek.latest.lifecycle.usage == KEK_USAGES
    assert kek.latest.lifecycle.activation == 5
    store.close()


# -- the real daemon: a rewrap job survives kill -9 ------------------------------------------


@pytest.mark.slow
def test_rewrap_job_resumes_after_kill_9_with_nothing_lost_or_doubled(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    first = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "0.log")
    assert first.stop() == 0
    config = data / "kmipd-slow-rewrap.toml"
    config.write_text(
        re.sub(r"listen = \[.*\]", 'listen = ["127.0.0.1:0"]', (data / "kmipd.toml").read_text())
        + "\n[lifecycle]\nrewrap_batch = 10\nrewrap_pause = 0.02\n"
    )
    pki = data / "pki"
    storage = {"ca": pki / "ca.pem", "cert": pki / "storage.pem", "key": pki / "storage-key.pem"}
    admin = {**storage, "cert": pki / "admin.pem", "key": pki / "admin-key.pem"}

    daemon = Daemon("--config", config, log=tmp_path / "1.log")
    with Client(daemon.address, **storage) as kms:
        keys = {d.dek_id: d.key_bytes() for d in (kms.create_dek("orders") for _ in range(200))}
    with Client(daemon.address, **admin) as admin_kms:
        admin_kms.rotate_kek("orders")
        job = admin_kms.start_rewrap("orders")
        deadline = time.monotonic() + 60
        while admin_kms.get_job(job.job_id).rewrapped < 30:  # progress, not done
            assert time.monotonic() < deadline
    daemon.kill()  # mid-job, likely mid-batch

    again = Daemon("--config", config, log=tmp_path / "2.log")
    with Client(again.address, **admin) as admin_kms:
        deadline = time.monotonic() + 60
        while (job := admin_kms.get_job(job.job_id)).state == "running":
            assert time.monotonic() < deadline
    assert (job.state, job.rewrapped, job.remaining, job.skipped) == ("done", 200, 0, 0)
    with Client(again.address, **storage) as kms:
        fetched = kms.get_deks(list(keys))
    assert {d.dek_id: d.key_bytes() for d in fetched} == keys  # nothing lost
    assert {d.kek_version for d in fetched} == {2}
    assert again.stop() == 0


@pytest.mark.slow
def test_lifecycle_from_the_command_line(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    daemon = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "d.log")
    pki = data / "pki"

    def kmipd(who: str, *args: str) -> Any:
        result = run_kmipd(
            *args,
            "--server",
            daemon.address,
            "--ca",
            pki / "ca.pem",
            "--cert",
            pki / f"{who}.pem",
            "--key",
            pki / f"{who}-key.pem",
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if result.stdout.strip() else None

    try:
        dek = kmipd("storage", "dek", "create", "--namespace", "orders")
        assert kmipd("admin", "kek", "rotate", "orders")["version"] == 2
        assert kmipd("admin", "kek", "dependents", "orders", "--version", "1")["count"] == 1
        job = kmipd("admin", "kek", "rewrap", "orders", "--wait")
        assert job["namespace"] == "orders"
        assert kmipd("admin", "dek", "attributes", dek["dek_id"])["version"] == 2
        revoked = kmipd("admin", "dek", "revoke", dek["dek_id"], "--reason", "superseded")
        assert revoked["state"] == "deactivated"
        listed = kmipd("admin", "key", "list", "--kind", "dek", "--state", "deactivated")
        assert [k["dek_id"] for k in listed["keys"]] == [dek["dek_id"]]
        pending = kmipd("admin", "dek", "destroy", dek["dek_id"])
        assert (pending["state"], pending["purge_at"] is not None) == ("deactivated", True)
        recovered = kmipd("admin", "dek", "recover", dek["dek_id"])
        assert (recovered["state"], recovered["purge_at"]) == ("deactivated", None)
        refused = run_kmipd(
            "dek", "revoke", dek["dek_id"], "--reason", "bored", "--server", daemon.address
        )
        assert refused.returncode == 2
        assert "invalid choice: 'bored'" in refused.stderr
        no_reason = run_kmipd("dek", "revoke", dek["dek_id"], "--server", daemon.address)
        assert no_reason.returncode == 2
        assert "--reason" in no_reason.stderr
    finally:
        assert daemon.stop() == 0
    audit = run_kmipd("audit", "verify", data / "audit.log")
    assert audit.returncode == 0, audit.stdout
    history = run_kmipd("audit", "query", data / "audit.log", "--dek", dek["dek_id"])
    assert [json.loads(line)["operation"] for line in history.stdout.splitlines()] == ["create-dek"]
