"""The software HSM's keyring in the PostgreSQL store, shared by every daemon.

kmipd.hsm and kmipd.store know nothing of each other: this adapter gives
the software backend the store's ``hsm_keyring`` table as a KeyringTable,
and turns the store's failures into the HSM's (a database that does not
answer is an HSM backend that does not answer).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from kmipd.hsm import HsmError, HsmUnavailableError
from kmipd.store import StoreError, StoreUnavailableError

if TYPE_CHECKING:  # psycopg is imported only when PostgreSQL is configured
    from kmipd.store._postgres import PostgresStore

T = TypeVar("T")


class StoreKeyring:
    """A KeyringTable over a PostgreSQL store; ``owned``: closing it closes the store."""

    def __init__(self, store: PostgresStore, *, owned: bool = False) -> None:
        self._store = store
        self._owned = owned
        self.where = f"the PostgreSQL store at {store.where}"

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except StoreUnavailableError as exc:  # also an unknown outcome: retryable
            raise HsmUnavailableError(f"{self.where}: {exc}") from None
        except StoreError as exc:
            raise HsmError(f"{self.where}: {exc}") from None

    async def entries(self, kind: str) -> dict[str, bytes]:
        return await self._call(lambda: self._store.keyring_entries(kind))

    async def entry(self, kind: str, handle: str) -> bytes | None:
        return await self._call(lambda: self._store.keyring_entry(kind, handle))

    async def add(self, kind: str, handle: str, label: str, sealed: bytes) -> bool:
        return await self._call(lambda: self._store.add_keyring_entry(kind, handle, label, sealed))

    async def remove(self, kind: str, handle: str) -> bool:
        return await self._call(lambda: self._store.remove_keyring_entry(kind, handle))

    def on_removed(self, callback: Callable[[str | None], None]) -> None:
        self._store.keyring_listeners.append(callback)

    def close(self) -> None:
        if self._owned:
            self._store.close()
        else:
            self._store.keyring_listeners.clear()
