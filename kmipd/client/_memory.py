"""Protected memory for keys held by the client library.

Key bytes handed to a storage system, and those kept in the DEK cache, live
in anonymous memory that is

* locked into RAM with ``mlock`` (never written to swap),
* excluded from core dumps with ``madvise(MADV_DONTDUMP)``,
* overwritten with zeros when the key is dropped.

What Python cannot guarantee, honestly stated: the key first arrives inside
TLS buffers and as an immutable ``bytes`` object produced by the CBOR
decoder; the library copies it here at once and drops its reference, but the
interpreter frees that object without wiping it. ``bytes(key)`` and
anything a caller derives from the buffer (e.g. cryptography's ``AESGCM``,
which keeps its own copy) are outside this protection. What *is* guaranteed:
the copies this library keeps for you are locked, not dumped, and zeroed on
eviction, expiry, ``close()`` and the end of a ``with`` block.

If ``mlock`` fails (RLIMIT_MEMLOCK too low, e.g. an unprivileged container),
the memory stays usable and zeroed on release, a warning is logged once, and
``ProtectedKey.locked`` is False.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hmac
import logging
import mmap
import os
import sys
import threading
from types import TracebackType

log = logging.getLogger("kmipd.client")

_PAGE = mmap.PAGESIZE
#: Slots are 64 bytes: a 256-bit key with room to spare, 64 of them per 4 KiB page.
SLOT_SIZE = 64
_SLOTS_PER_CHUNK = 64 * _PAGE // SLOT_SIZE  # 256 KiB chunks: 4,096 keys each

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mlock.restype = ctypes.c_int


class KeyWipedError(ValueError):
    """The key was already zeroed (its ``with`` block ended, or it was closed)."""


class _Chunk:
    def __init__(self) -> None:
        self.size = _SLOTS_PER_CHUNK * SLOT_SIZE
        self.memory = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.memory.madvise(mmap.MADV_DONTDUMP)
        self._anchor = (ctypes.c_char * self.size).from_buffer(self.memory)
        self.address = ctypes.addressof(self._anchor)
        self.locked = _libc.mlock(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size)) == 0
        self.lock_errno = 0 if self.locked else ctypes.get_errno()
        self.free = list(range(_SLOTS_PER_CHUNK - 1, -1, -1))

    def wipe(self, slot: int) -> None:
        ctypes.memset(self.address + slot * SLOT_SIZE, 0, SLOT_SIZE)


class _Arena:
    """Process-wide slots of locked memory; grows a chunk at a time, never shrinks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: list[_Chunk] = []
        self._warned = False

    def allocate(self, data: bytes | bytearray | memoryview) -> tuple[_Chunk, int]:
        if len(data) > SLOT_SIZE:
            raise ValueError(f"protected keys are at most {SLOT_SIZE} bytes")
        with self._lock:
            chunk = next((c for c in self._chunks if c.free), None)
            if chunk is None:
                chunk = _Chunk()
                self._chunks.append(chunk)
                if not chunk.locked and not self._warned:
                    self._warned = True
                    log.warning(
                        "could not lock key memory into RAM (%s); keys may reach swap. "
                        "Raise RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=) to at least %d KiB",
                        os.strerror(chunk.lock_errno or errno.ENOMEM),
                        chunk.size // 1024,
                    )
            slot = chunk.free.pop()
        start = slot * SLOT_SIZE
        chunk.memory[start : start + len(data)] = data
        return chunk, slot

    def release(self, chunk: _Chunk, slot: int, *, reusable: bool) -> None:
        chunk.wipe(slot)
        if reusable:
            with self._lock:
                chunk.free.append(slot)


_ARENA = _Arena()


class _Protected:
    """What ProtectedKey and ProtectedValue share: the view, comparison, repr, wiping on drop.

    A subclass allocates the memory, sets ``_length`` and ``_view`` (None once
    wiped), and says whether it is ``locked`` and how to ``wipe`` it.
    """

    __slots__ = ("__weakref__", "_length", "_view")
    #: What the bytes are, for the error after a wipe.
    _WHAT = "key"
    _length: int
    _view: memoryview | None

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise KeyWipedError(f"this {self._WHAT} has been wiped")
        return self._view

    @property
    def locked(self) -> bool:
        raise NotImplementedError

    @property
    def wiped(self) -> bool:
        raise NotImplementedError

    def wipe(self) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._length

    def __bytes__(self) -> bytes:
        """An unprotected copy: the caller owns its fate (see the module docs)."""
        return bytes(self.view)

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __del__(self) -> None:
        self.wipe()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Protected):
            return hmac.compare_digest(self.view, other.view)
        if isinstance(other, bytes | bytearray | memoryview):
            return hmac.compare_digest(self.view, other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        name = type(self).__name__
        if self.wiped:
            return f"<{name} wiped>"
        return f"<{name} {self._length} bytes{', locked' if self.locked else ''}>"


class ProtectedKey(_Protected):
    """Key bytes in locked, non-dumpable memory, zeroed by ``wipe``.

    ``view`` is a read-only memoryview of the key, valid until the key is
    wiped; use the key as a context manager to wipe it when done:

        with protected as key:
            AESGCM(key).decrypt(...)
    """

    __slots__ = ("_chunk", "_holder", "_slot")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._length = len(data)
        self._chunk: _Chunk | None
        self._chunk, self._slot = _ARENA.allocate(data)
        # Views are made through a per-key ctypes object, so that any view a
        # caller derives (a slice...) keeps a reference to it: at wipe time
        # its reference count says whether the slot may be handed out again.
        self._holder: ctypes.Array[ctypes.c_char] | None = (
            ctypes.c_char * self._length
        ).from_buffer(self._chunk.memory, self._slot * SLOT_SIZE)
        self._view = memoryview(self._holder).cast("B").toreadonly()

    @property
    def locked(self) -> bool:
        """Whether mlock succeeded for this key's memory."""
        return self._chunk is not None and self._chunk.locked

    @property
    def wiped(self) -> bool:
        return self._chunk is None

    def copy(self) -> ProtectedKey:
        return ProtectedKey(self.view)

    def wipe(self) -> None:
        """Zero the key now. Safe to call twice."""
        chunk, view, holder = self._chunk, self._view, self._holder
        if chunk is None:
            return
        self._chunk = self._view = self._holder = None
        reusable = True
        if view is not None:
            try:
                view.release()
            except BufferError:
                reusable = False
        # Two references: ``holder`` and getrefcount's argument. More means a
        # caller still holds a view derived from ours: zero the slot but never
        # hand it out again, so that view cannot come to show another key.
        if sys.getrefcount(holder) > 2:
            reusable = False
        del holder
        _ARENA.release(chunk, self._slot, reusable=reusable)


class ProtectedValue(_Protected):
    """A secret value of any size in its own locked, non-dumpable pages, zeroed by ``wipe``.

    The same protection as ProtectedKey (whose 64-byte slots hold keys), for
    values up to the daemon's secrets.max_size: one private anonymous mapping
    per value, rounded up to whole pages.
    """

    __slots__ = ("_locked", "_memory")
    _WHAT = "value"

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._length = len(data)
        size = max(_PAGE, -(-self._length // _PAGE) * _PAGE)
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory.madvise(mmap.MADV_DONTDUMP)
        anchor = (ctypes.c_char * size).from_buffer(memory)
        self._locked = _libc.mlock(ctypes.c_void_p(ctypes.addressof(anchor)), size) == 0
        del anchor
        memory[: self._length] = data
        self._memory: mmap.mmap | None = memory
        self._view = memoryview(memory)[: self._length].toreadonly()

    @property
    def locked(self) -> bool:
        return self._memory is not None and self._locked

    @property
    def wiped(self) -> bool:
        return self._memory is None

    def wipe(self) -> None:
        """Zero the value now (and unmap it unless a caller still holds a view). Idempotent."""
        memory, view = self._memory, self._view
        if memory is None:
            return
        self._memory = self._view = None
        memory[:] = bytes(len(memory))
        if view is not None:
            view.release()
        with contextlib.suppress(BufferError):
            memory.close()  # refused while a caller's derived view lives: it stays zeroed
