"""The store's side of backup and restore: a consistent copy in, a copy put back.

A snapshot is taken with SQLite's online backup API through a read-only
connection, so it is consistent even while a daemon writes, and the live
store is never written to. The copy is one self-contained file (rollback
journal mode, no ``-wal`` beside it) holding exactly what the store holds:
wrapped keys and metadata, never a plaintext key.

Putting a snapshot back needs the store to itself: the same exclusive lock
a daemon takes, so a restore under a running daemon is refused. The store
it replaces (with its ``-wal`` and ``-shm``, which belong to it and must
never be applied to another database) is moved aside, not deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import attrs

from kmipd.store._sqlite import SCHEMA_VERSION, StoreError, _lock

#: Destroyed KEK versions may be gone from the HSM: their handles are not required.
_DESTROYED_STATES = ("destroyed", "destroyed-compromised")


@attrs.frozen
class StoreSnapshot:
    path: Path
    store_id: str
    schema_version: int
    deks: int
    kek_versions: int
    #: HSM handles of KEK versions not destroyed: the HSM must still hold each.
    live_hsm_handles: frozenset[str]
    #: Stored secret versions (wrapped values); 0 before the store had secrets.
    secret_versions: int = 0


def snapshot_store(store_path: Path, destination: Path) -> StoreSnapshot:
    """Copy the (possibly live) store at ``store_path`` to the new file ``destination``."""
    if not store_path.is_file():
        raise StoreError(f"store {store_path} does not exist")
    # Created 0600 before SQLite opens it: wrapped keys are still nobody else's business.
    os.close(os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    try:
        source = sqlite3.connect(f"{store_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            target = sqlite3.connect(destination)
            try:
                source.backup(target)
                target.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot copy store {store_path}: {exc}") from None
    return inspect_snapshot(destination)


def inspect_snapshot(path: Path) -> StoreSnapshot:
    """Check a snapshot file (intact, a kmipd store, not from a newer kmipd) and describe it."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open: {exc}") from None
    try:
        (check,) = db.execute("PRAGMA integrity_check").fetchone()
        if check != "ok":
            raise StoreError(f"{path}: the database is damaged ({check})")
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema version {version} is newer than this kmipd's ({SCHEMA_VERSION})"
            )
        (store_id,) = db.execute("SELECT value FROM store_meta WHERE name = 'store_id'").fetchone()
        (deks,) = db.execute("SELECT count(*) FROM deks").fetchone()
        columns = {row[1] for row in db.execute("PRAGMA table_info(kek_versions)")}
        query = "SELECT hsm_handle FROM kek_versions WHERE hsm_handle != ''"
        if "state" in columns:
            query += " AND state NOT IN (?, ?)"
            rows = db.execute(query, _DESTROYED_STATES).fetchall()
        else:
            rows = db.execute(query).fetchall()
        (kek_versions,) = db.execute("SELECT count(*) FROM kek_versions").fetchone()
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        secret_versions = (
            db.execute("SELECT count(*) FROM secret_versions").fetchone()[0]
            if "secret_versions" in tables
            else 0
        )
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a kmipd store ({exc})") from None
    finally:
        db.close()
    return StoreSnapshot(
        path,
        store_id,
        version,
        int(deks),
        int(kek_versions),
        frozenset(r[0] for r in rows),
        int(secret_versions),
    )


@contextlib.contextmanager
def exclusive_store_lock(store_path: Path) -> Iterator[None]:
    """Hold the store as a daemon does; StoreError if a daemon is using it."""
    store_path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(store_path, shared=False)
    try:
        yield
    finally:
        os.close(fd)


def store_files(store_path: Path) -> list[Path]:
    """The store and the journal files that belong to it, those that exist."""
    candidates = [
        store_path,
        *(store_path.with_name(store_path.name + s) for s in ("-wal", "-shm")),
    ]
    return [path for path in candidates if path.exists()]


def move_store_aside(store_path: Path, suffix: str) -> Path | None:
    """Rename the store and its journal files together; where the store went, if it existed."""
    moved = None
    for path in store_files(store_path):
        target = path.with_name(path.name.replace(store_path.name, store_path.name + suffix, 1))
        os.replace(path, target)
        if path == store_path:
            moved = target
    return moved


def install_snapshot(snapshot: Path, store_path: Path) -> None:
    """Copy a snapshot into place as the store (atomically); hold exclusive_store_lock."""
    if store_files(store_path):
        raise StoreError(f"store {store_path} exists; move it aside first")
    temporary = store_path.with_name(f".{store_path.name}.restore.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, snapshot.open("rb") as source:
            shutil.copyfileobj(source, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, store_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    directory = os.open(store_path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
