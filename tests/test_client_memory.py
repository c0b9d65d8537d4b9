"""Protected memory and the DEK cache: locking, zeroization, expiry, concurrency."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kmipd.client import DekCache, KeyWipedError, ProtectedKey, ProtectedValue
from kmipd.client._memory import SLOT_SIZE

SECRET = bytes(range(1, 33))


def slot_contents(key: ProtectedKey) -> tuple[object, int]:
    """Where a key lives, captured before it is wiped, to read the memory afterwards."""
    return key._chunk, key._slot


def read_slot(location: tuple[object, int]) -> bytes:
    chunk, slot = location
    return bytes(chunk.memory[slot * SLOT_SIZE : (slot + 1) * SLOT_SIZE])  # type: ignore[attr-defined]


def vm_flags(address: int) -> set[str]:
    """The kernel's flags for the mapping that holds ``address`` (/proc/self/smaps)."""
    flags: set[str] = set()
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split()[0] and not line.startswith(("VmFlags", " ")):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            current = start <= address < end
        elif line.startswith("VmFlags") and current:
            flags = set(line.split()[1:])
    return flags


def test_key_is_locked_and_zeroed_when_its_block_ends() -> None:
    key = ProtectedKey(SECRET)
    assert key.locked
    where = slot_contents(key)
    assert read_slot(where)[:32] == SECRET
    with key as view:
        assert bytes(view) == SECRET
        assert view.readonly
    assert read_slot(where) == bytes(SLOT_SIZE)
    assert key.wiped
    assert repr(key) == "<ProtectedKey wiped>"
    with pytest.raises(KeyWipedError):
        _ = key.view
    with pytest.raises(ValueError, match="released"):
        bytes(view)  # the view handed out is dead, not pointing at reused memory


def test_repr_and_str_never_show_key_bytes() -> None:
    key = ProtectedKey(SECRET)
    for text in (repr(key), str(key)):
        assert SECRET.hex() not in text
        assert "32 bytes" in text


def test_a_slice_held_by_a_caller_keeps_the_slot_out_of_reuse() -> None:
    key = ProtectedKey(SECRET)
    where = slot_contents(key)
    piece = key.view[:16]  # a derived view the library cannot release
    key.wipe()
    assert bytes(piece) == bytes(16)  # zeroed all the same
    for _ in range(300):  # allocate past the freed slots: never the held one
        assert slot_contents(ProtectedKey(b"\xff" * 32)) != where
    assert bytes(piece) == bytes(16)


def test_dropping_the_last_reference_zeroes_the_key() -> None:
    key = ProtectedKey(SECRET)
    where = slot_contents(key)
    del key
    assert read_slot(where) == bytes(SLOT_SIZE)


def test_memory_is_excluded_from_core_dumps() -> None:
    key = ProtectedKey(SECRET)
    flags = vm_flags(key._chunk.address)  # type: ignore[union-attr]
    assert "dd" in flags  # "do not include area into core dump"
    assert "lo" in flags  # locked


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_mlock_failure_degrades_with_a_warning() -> None:
    """Without CAP_IPC_LOCK and with RLIMIT_MEMLOCK at 0, mlock fails: keys still work."""
    program = (
        "import logging, resource\n"
        "resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "from kmipd.client import ProtectedKey\n"
        "key = ProtectedKey(b'k' * 32)\n"
        "with key as view:\n"
        "    assert bytes(view) == b'k' * 32\n"
        "print('locked' if key.locked else 'unlocked')\n"
    )
    result = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-ipc_lock",
            "--bounding-set=-ipc_lock",
            sys.executable,
            "-c",
            program,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "unlocked"
    assert "WARNING could not lock key memory into RAM" in result.stderr
    assert "LimitMEMLOCK" in result.stderr


# -- the cache ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_serves_copies_and_zeroes_evicted_entries() -> None:
    cache = DekCache(max_entries=2, ttl=60)
    cache.store("a", "meta-a", SECRET)
    first = cache.lookup("a")
    assert first is not None
    meta, copy = first
    assert meta == "meta-a"
    assert bytes(copy.view) == SECRET
    stored_where = slot_contents(cache._entries["a"].protected)
    copy.wipe()  # the caller's copy is independent of the cache's
    assert bytes(cache._entries["a"].protected.view) == SECRET
    cache.store("b", "meta-b", SECRET)
    cache.store("c", "meta-c", SECRET)  # evicts "a", the least recently used
    assert cache.lookup("a") is None
    assert read_slot(stored_where) == bytes(SLOT_SIZE)
    assert cache.stats.evictions == 1


def test_cache_expires_after_ttl_and_serves_stale_only_when_asked() -> None:
    clock = FakeClock()
    cache = DekCache(ttl=10, stale_grace=5, clock=clock)
    cache.store("k", "m", SECRET)
    clock.now += 10.5
    assert cache.lookup("k") is None  # past TTL: not fresh
    stale = cache.lookup("k", allow_stale=True)
    assert stale is not None  # within the grace period, on request
    assert cache.stats.stale_hits == 1
    where = slot_contents(cache._entries["k"].protected)
    clock.now += 5
    assert cache.lookup("k", allow_stale=True) is None  # grace over: wiped
    assert read_slot(where) == bytes(SLOT_SIZE)


def test_cache_without_grace_never_serves_expired() -> None:
    clock = FakeClock()
    cache = DekCache(ttl=10, clock=clock)
    cache.store("k", "m", SECRET)
    clock.now += 10.001
    assert cache.lookup("k", allow_stale=True) is None


def test_evict_where_and_clear_zero_everything() -> None:
    cache = DekCache()
    for name in ("x1", "x2", "y1"):
        cache.store(name, name[0], SECRET)
    locations = {name: slot_contents(cache._entries[name].protected) for name in cache._entries}
    assert cache.evict_where(lambda key, meta: meta == "x") == 2
    assert all(read_slot(locations[n]) == bytes(SLOT_SIZE) for n in ("x1", "x2"))
    cache.clear()
    assert len(cache) == 0
    assert read_slot(locations["y1"]) == bytes(SLOT_SIZE)


def test_cache_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="ttl"):
        DekCache(ttl=0)
    with pytest.raises(ValueError, match="max_entries"):
        DekCache(max_entries=0)


def test_cache_under_many_threads_never_hands_out_a_wiped_or_wrong_key() -> None:
    cache = DekCache(max_entries=50, ttl=60)
    keys = {f"dek{i}": bytes([i]) * 32 for i in range(120)}
    errors: list[str] = []
    barrier = threading.Barrier(16)

    def worker(seed: int) -> None:
        barrier.wait()
        for n in range(2000):
            name = f"dek{(seed * 7 + n) % 120}"
            if n % 3 == 0:
                cache.store(name, name, keys[name])
            hit = cache.lookup(name)
            if hit is not None:
                meta, copy = hit
                with copy as view:
                    if meta != name or bytes(view) != keys[name]:
                        errors.append(name)
            if n % 97 == 0:
                cache.evict(name)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(cache) <= 50
    assert cache.stats.hits > 0


def test_a_secret_value_of_any_size_is_locked_undumped_and_zeroed() -> None:
    value = os.urandom(64 * 1024 + 5)  # larger than a key slot, than a page
    protected = ProtectedValue(value)
    assert protected.locked and len(protected) == len(value)
    assert protected == value and protected == ProtectedValue(value)
    assert protected != ProtectedValue(b"other")
    memory = protected._memory
    assert memory is not None
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    assert {"dd", "lo"} <= vm_flags(address)  # no core dump; locked in RAM
    assert value.hex()[:16] not in repr(protected)
    assert repr(protected) == f"<ProtectedValue {len(value)} bytes, locked>"
    piece = protected.view[:100]  # a derived view the library cannot release
    with protected as view:
        assert bytes(view) == value
    assert protected.wiped and repr(protected) == "<ProtectedValue wiped>"
    assert bytes(piece) == bytes(100)  # zeroed all the same (still mapped, for the view)
    with pytest.raises(KeyWipedError, match="value has been wiped"):
        _ = protected.view
    with pytest.raises(ValueError, match="released"):
        bytes(view)
