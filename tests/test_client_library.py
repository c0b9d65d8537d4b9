"""The storage-system client: cache in the data path, outages, pools, deadlines, retries."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from kmipd.client import (
    Client,
    DeadlineExceededError,
    DekCache,
    KeyWipedError,
    KmipdError,
    UnavailableError,
)
from kmipd.client._keys import KeyKeeper
from kmipd.protocol import ChangeInfo, ChangesResult, DekResult
from tests.conftest import RunningServer, ServerFactory
from tests.processes import Daemon


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def dev_daemon(tmp_path: Path) -> tuple[Daemon, dict[str, Path]]:
    data = tmp_path / "dev"
    daemon = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "d.log")
    pki = data / "pki"
    return daemon, {
        "ca": pki / "ca.pem",
        "cert": pki / "storage.pem",
        "key": pki / "storage-key.pem",
    }


async def test_cached_gets_skip_the_round_trip(kmipd: RunningServer) -> None:
    cache = DekCache(ttl=60)

    def work() -> None:
        with kmipd.client(cache=cache) as kms:
            with kms.create_dek("orders") as created:
                expected = bytes(created.key)
            for _ in range(5):
                with kms.get_dek(created.dek_id) as dek:
                    assert bytes(dek.key) == expected
            assert cache.stats.hits == 5
            assert cache.stats.misses == 0  # create-dek filled the cache

    await trio.to_thread.run_sync(work)


async def test_keys_handed_out_are_zeroed_when_their_block_ends(kmipd: RunningServer) -> None:
    def work() -> None:
        with kmipd.client() as kms:
            dek = kms.create_dek("orders")
            with dek:
                view = dek.key
                assert len(bytes(view)) == 32
            with pytest.raises(KeyWipedError):
                _ = dek.key
            with pytest.raises(ValueError, match="released"):
                bytes(view)

    await trio.to_thread.run_sync(work)


@pytest.mark.slow
def test_stale_entries_carry_a_node_through_a_short_outage(tmp_path: Path) -> None:
    daemon, creds = dev_daemon(tmp_path)
    clock = FakeClock()
    cache = DekCache(ttl=10, stale_grace=30, clock=clock)
    with Client(daemon.address, **creds, cache=cache, timeout=2) as kms:
        dek_id = kms.create_dek("orders").dek_id
        expected = kms.get_dek(dek_id).key_bytes()
        assert daemon.stop() == 0  # the daemon goes away
        clock.now += 15  # past the TTL, inside the grace period
        with kms.get_dek(dek_id) as dek:
            assert bytes(dek.key) == expected
        assert cache.stats.stale_hits == 1
        clock.now += 30  # past the grace period: no more
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            kms.get_dek(dek_id)


@pytest.mark.slow
def test_without_stale_grace_an_expired_entry_is_not_served(tmp_path: Path) -> None:
    daemon, creds = dev_daemon(tmp_path)
    clock = FakeClock()
    cache = DekCache(ttl=10, clock=clock)
    with Client(daemon.address, **creds, cache=cache, timeout=2) as kms:
        dek_id = kms.create_dek("orders").dek_id
        assert daemon.stop() == 0
        clock.now += 11
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            kms.get_dek(dek_id)


async def test_blocking_client_is_safe_from_many_threads(start_server: ServerFactory) -> None:
    kmipd = await start_server()
    cache = DekCache(max_entries=8, ttl=60)  # smaller than the working set: evictions happen
    failures: list[BaseException] = []

    def work() -> None:
        with kmipd.client(cache=cache, pool_size=3) as kms:
            ids = [kms.create_dek("orders").dek_id for _ in range(20)]
            keys = {dek.dek_id: dek.key_bytes() for dek in kms.get_deks(ids)}
            barrier = threading.Barrier(12)

            def reader(offset: int) -> None:
                try:
                    barrier.wait()
                    for n in range(150):
                        dek_id = ids[(offset + n) % len(ids)]
                        with kms.get_dek(dek_id) as dek:
                            assert bytes(dek.key) == keys[dek_id]
                except BaseException as exc:  # collected and asserted below
                    failures.append(exc)

            threads = [threading.Thread(target=reader, args=(i,)) for i in range(12)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)

    await trio.to_thread.run_sync(work)
    assert failures == []
    assert cache.stats.hits > 0
    assert cache.stats.evictions > 0


async def test_pool_never_opens_more_connections_than_asked(start_server: ServerFactory) -> None:
    kmipd = await start_server()
    peak = 0

    def work() -> None:
        nonlocal peak
        with kmipd.client(pool_size=2) as kms:
            dek_id = kms.create_dek("orders").dek_id
            barrier = threading.Barrier(8)

            def reader() -> None:
                nonlocal peak
                barrier.wait()
                for _ in range(50):
                    kms.get_dek(dek_id).close()
                    peak = max(peak, kmipd.server.connection_count)

            threads = [threading.Thread(target=reader) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)

    await trio.to_thread.run_sync(work)
    assert 1 <= peak <= 2


async def test_create_retried_with_the_same_idempotency_key_returns_the_same_dek(
    kmipd: RunningServer,
) -> None:
    async with kmipd.async_client() as kms:
        key = b"k" * 16
        first = await kms.create_dek("orders", idempotency_key=key)
        again = await kms.create_dek("orders", idempotency_key=key)
        assert again.dek_id == first.dek_id
        assert again.key_bytes() == first.key_bytes()
        other = await kms.create_dek("orders")
        assert other.dek_id != first.dek_id
        with pytest.raises(Exception, match="idempotency key already used"):
            await kms.create_dek("elsewhere", idempotency_key=key)
    # Another identity's key space is its own.
    async with kmipd.async_client("tenant") as tenant:
        theirs = await tenant.create_dek("tenant-a", idempotency_key=key)
        assert theirs.dek_id != first.dek_id


async def test_concurrent_duplicates_of_one_create_make_one_dek(kmipd: RunningServer) -> None:
    async with kmipd.async_client() as kms:
        key = b"d" * 16
        made: list[str] = []

        async def create() -> None:
            made.append((await kms.create_dek("orders", idempotency_key=key)).dek_id)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(create)
        assert len(set(made)) == 1


async def test_hello_reports_the_store_identity(kmipd: RunningServer) -> None:
    async with kmipd.async_client() as kms:
        info = await kms.connect()
    assert info.identity == "spiffe://kmipd.test/storage"
    assert info.store_id == kmipd.store.store_id
    assert len(info.store_id) == 32


async def test_revocation_reaches_the_cache(kmipd: RunningServer) -> None:
    cache = DekCache(ttl=3600)

    def work() -> None:
        with kmipd.client(cache=cache, revocation_check=0) as kms, kmipd.client("admin") as admin:
            dek = kms.create_dek("orders")
            data_key = kms.generate_data_key("orders")
            assert kms.get_dek(dek.dek_id).key_bytes() == dek.key_bytes()  # cached
            admin.revoke("key-compromise", dek_id=dek.dek_id)
            with pytest.raises(KmipdError, match="compromised"):
                kms.get_dek(dek.dek_id)  # evicted, and the daemon refuses it
            assert ("dek", dek.dek_id) not in cache._entries
            # A KEK version's revocation evicts every key it wraps, data keys too.
            admin.rotate_kek("orders")
            admin.revoke("key-compromise", kek="orders", version=1)
            with pytest.raises(KmipdError, match="compromised"):
                kms.unwrap(data_key.blob)

    await trio.to_thread.run_sync(work)


def test_the_cache_asks_about_revocations_at_most_every_interval() -> None:
    keeper = KeyKeeper(DekCache(), revocation_check=5.0)
    assert keeper.changes_due(100.0)  # never asked: ask first
    keeper.apply_changes(ChangesResult(changes=(), seq=42), 100.0)
    assert not keeper.changes_due(104.9)
    assert keeper.changes_due(105.0)  # the stated bound: 5 seconds
    assert keeper.cache is not None
    keeper.cache.store(("dek", "dek_a"), ("orders", 1), b"k" * 32)
    revoked = ChangeInfo(seq=43, at=0, namespace="orders", state="compromised", dek_id="dek_a")
    assert keeper.apply_changes(ChangesResult(changes=(revoked,), seq=43), 105.0) == 1
    assert keeper.cached_dek("dek_a") is None
    assert KeyKeeper(None, 5.0).changes_due(0) is False  # no cache, nothing to follow


def test_a_cache_behind_the_pruned_feed_empties_and_zeroes_itself() -> None:
    keeper = KeyKeeper(DekCache(), revocation_check=5.0)
    keeper.apply_changes(ChangesResult(changes=(), seq=42), 100.0)
    a = keeper.keep_dek(DekResult(dek_id="dek_a", namespace="orders", kek_version=1, key=b"a" * 32))
    b = keeper.keep_dek(DekResult(dek_id="dek_b", namespace="other", kek_version=1, key=b"b" * 32))
    a.close()
    b.close()
    assert keeper.cache is not None
    cached = [entry.protected for entry in keeper.cache._entries.values()]  # the cache's copies
    assert len(cached) == 2 and not any(protected.wiped for protected in cached)
    # Changes after 42 were pruned: which keys they touched is unknown, so every one goes.
    assert keeper.apply_changes(ChangesResult(changes=(), seq=900, reset=True), 105.0) == 2
    assert keeper.cached_dek("dek_a") is None and keeper.cached_dek("dek_b") is None
    assert keeper.changes_seq == 900
    assert len(keeper.cache) == 0
    assert all(protected.wiped for protected in cached)
