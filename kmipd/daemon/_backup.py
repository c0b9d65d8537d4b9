"""``kmipd backup`` / ``kmipd restore``: the store and the HSM material, never a plaintext key.

A backup is one tar archive (mode 0600) with:

* ``kmipd-backup.json``: format, time, store id, counts, and the SHA-256
  of each other member (a damaged archive is refused before anything is
  written);
* ``store.sqlite``: a consistent snapshot of the key store, taken online
  (wrapped DEKs, wrapped secret values and KEK metadata only);
* ``keyring.cbor`` (software HSM backend): the KEKs, each sealed under the
  master key, copied after the store snapshot, so every KEK the snapshot
  refers to is in it.

What is deliberately *not* in it: the master key (plaintext key material:
it is backed up once, separately and offline; an archive is useless
without it, and it is useless without an archive), the TLS private key
and the audit key (credentials, re-issued rather than restored), and the
audit trail (logs, kept by log retention).

A restore checks everything first — checksums, the snapshot's integrity,
the keyring opening with the configured master key, every live KEK of the
snapshot present in the keyring — then takes the store's lock (so it is
refused while a daemon runs), moves what it replaces aside and puts the
backup in place.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import attrs

from kmipd.daemon.config import Config
from kmipd.hsm import (
    HsmError,
    SoftwareHsm,
    keyring_handles,
    read_keyring_file,
    read_master_key,
)
from kmipd.store._backup import (
    StoreSnapshot,
    exclusive_store_lock,
    inspect_snapshot,
    install_snapshot,
    move_store_aside,
    snapshot_store,
    store_files,
)
from pki import write_private_file

BACKUP_FORMAT = "kmipd-backup/1"
MANIFEST = "kmipd-backup.json"
STORE_MEMBER = "store.sqlite"
KEYRING_MEMBER = "keyring.cbor"
_CHUNK = 1 << 20


class BackupError(Exception):
    """The backup or restore cannot proceed; nothing was changed. The message says why."""


@attrs.frozen
class BackupSummary:
    path: Path
    store_id: str
    deks: int
    kek_versions: int
    #: KEKs in the keyring copy; None when the HSM backend keeps its own keys.
    keyring_keks: int | None
    secret_versions: int = 0


@attrs.frozen
class RestoreSummary:
    store_id: str
    deks: int
    kek_versions: int
    #: Where the replaced store and keyring were moved (kept, not deleted).
    moved_aside: list[Path]
    secret_versions: int = 0


# -- backup --------------------------------------------------------------------------------


def _sqlite_path(config: Config) -> Path:
    try:
        return config.sqlite_path()
    except ValueError as exc:
        raise BackupError(f"kmipd backup/restore: {exc}") from None


def create_backup(config: Config, output: Path, *, force: bool = False) -> BackupSummary:
    store_path = _sqlite_path(config)
    if output.exists() and not force:
        raise BackupError(f"{output} already exists; pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".kmipd-backup-") as work_dir:
        work = Path(work_dir)
        snapshot = snapshot_store(store_path, work / STORE_MEMBER)
        members = {STORE_MEMBER: snapshot.path}
        keyring_keks = None
        if config.hsm_backend == "software":
            # After the store snapshot: a KEK enters the keyring before its row commits.
            _, keyring_path = config.software_files()
            keyring = read_keyring_file(keyring_path)
            if keyring is None:
                raise BackupError(f"hsm.keyring: {keyring_path} does not exist")
            write_private_file(work / KEYRING_MEMBER, keyring)
            members[KEYRING_MEMBER] = work / KEYRING_MEMBER
            keyring_keks = len(_sealed_handles(keyring, keyring_path))
        manifest = _manifest(config, snapshot, members)
        _write_archive(output, manifest, members)
    return BackupSummary(
        output,
        snapshot.store_id,
        snapshot.deks,
        snapshot.kek_versions,
        keyring_keks,
        snapshot.secret_versions,
    )


def _manifest(config: Config, snapshot: StoreSnapshot, members: dict[str, Path]) -> dict[str, Any]:
    try:
        version = importlib.metadata.version("kmipd")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "format": BACKUP_FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kmipd": version,
        "store_id": snapshot.store_id,
        "schema_version": snapshot.schema_version,
        "hsm_backend": config.hsm_backend,
        "deks": snapshot.deks,
        "kek_versions": snapshot.kek_versions,
        "secret_versions": snapshot.secret_versions,
        "files": {
            name: {"sha256": _sha256(path), "size": path.stat().st_size}
            for name, path in members.items()
        },
    }


def _write_archive(output: Path, manifest: dict[str, Any], members: dict[str, Path]) -> None:
    temporary = output.with_name(f".{output.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
                data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
                archive.addfile(_member(MANIFEST, len(data)), io.BytesIO(data))
                for name, path in members.items():
                    with path.open("rb") as source:
                        archive.addfile(_member(name, path.stat().st_size), source)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(time.time())
    return info


# -- restore -------------------------------------------------------------------------------


def restore_backup(config: Config, archive: Path, *, force: bool = False) -> RestoreSummary:
    store_path = _sqlite_path(config)
    target_dir = store_path.parent
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".kmipd-restore-") as work_dir:
        work = Path(work_dir)
        manifest = _extract(archive, work)
        snapshot = inspect_snapshot(work / STORE_MEMBER)
        if snapshot.store_id != manifest.get("store_id"):
            raise BackupError(f"{archive}: the store does not match the manifest")
        keyring: bytes | None = None
        keyring_path = Path()
        if config.hsm_backend == "software":
            keyring = _checked_keyring(config, work, snapshot, archive)
            _, keyring_path = config.software_files()
        with exclusive_store_lock(store_path):
            existing = store_files(store_path)
            if keyring is not None and keyring_path.exists():
                existing.append(keyring_path)
            if existing and not force:
                raise BackupError(
                    "restoring would replace "
                    + ", ".join(str(p) for p in existing)
                    + "; pass --force to move them aside and restore"
                )
            suffix = f".before-restore-{time.strftime('%Y%m%dT%H%M%S')}"
            moved = [path for path in [move_store_aside(store_path, suffix)] if path]
            install_snapshot(work / STORE_MEMBER, store_path)
            _own_like_directory(store_path)
            if keyring is not None:
                if keyring_path.exists():
                    aside = keyring_path.with_name(keyring_path.name + suffix)
                    os.replace(keyring_path, aside)
                    moved.append(aside)
                write_private_file(keyring_path, keyring)
                _own_like_directory(keyring_path)
    return RestoreSummary(
        snapshot.store_id, snapshot.deks, snapshot.kek_versions, moved, snapshot.secret_versions
    )


def _extract(archive: Path, work: Path) -> dict[str, Any]:
    """Unpack the expected members into ``work``, checking each against the manifest."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = {member.name: member for member in tar.getmembers()}
            if MANIFEST not in members:
                raise BackupError(f"{archive}: not a kmipd backup (no {MANIFEST})")
            manifest: dict[str, Any] = json.loads(_read_member(tar, members[MANIFEST]).read())
            if manifest.get("format") != BACKUP_FORMAT:
                raise BackupError(
                    f"{archive}: backup format {manifest.get('format')!r} is not {BACKUP_FORMAT}"
                )
            files: dict[str, dict[str, Any]] = manifest.get("files", {})
            unexpected = set(members) - {MANIFEST, *files}
            if unexpected or not set(files) <= {STORE_MEMBER, KEYRING_MEMBER}:
                raise BackupError(
                    f"{archive}: unexpected members {sorted(unexpected | set(files))}"
                )
            for name, expected in files.items():
                if name not in members:
                    raise BackupError(f"{archive}: {name} is missing")
                digest = hashlib.sha256()
                fd = os.open(work / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    for chunk in _chunks(_read_member(tar, members[name])):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != expected.get("sha256"):
                    raise BackupError(f"{archive}: {name} is damaged (checksum mismatch)")
    except (tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise BackupError(f"{archive}: not a readable kmipd backup ({exc})") from None
    except OSError as exc:
        raise BackupError(f"cannot read {archive}: {exc.strerror}") from None
    if STORE_MEMBER not in files:
        raise BackupError(f"{archive}: holds no store")
    return manifest


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    source = tar.extractfile(member) if member.isreg() else None
    if source is None:
        raise BackupError(f"{member.name}: not a regular file in the archive")
    return source


def _chunks(source: IO[bytes]) -> Iterator[bytes]:
    while chunk := source.read(_CHUNK):
        yield chunk


def _checked_keyring(config: Config, work: Path, snapshot: StoreSnapshot, archive: Path) -> bytes:
    path = work / KEYRING_MEMBER
    if not path.exists():
        raise BackupError(f"{archive}: holds no keyring, but hsm.backend is software")
    try:
        master_key = read_master_key(config.software_files()[0])
        SoftwareHsm(master_key, path).close()  # every entry opens with this master key
    except HsmError as exc:
        raise BackupError(f"the backup's keyring cannot be used: {exc}") from None
    data = path.read_bytes()
    missing = snapshot.live_hsm_handles - _sealed_handles(data, path)
    if missing:
        raise BackupError(
            f"{archive}: the keyring lacks {len(missing)} KEK(s) the store uses; "
            "the archive is inconsistent"
        )
    return data


def _sealed_handles(keyring: bytes, where: Path) -> frozenset[str]:
    try:
        return keyring_handles(keyring, where)
    except HsmError as exc:
        raise BackupError(str(exc)) from None


def _own_like_directory(path: Path) -> None:
    """Run as root (the usual way to restore), give files to the service's user."""
    if os.geteuid() != 0:
        return
    directory = path.parent.stat()
    os.chown(path, directory.st_uid, directory.st_gid)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for chunk in _chunks(source):
            digest.update(chunk)
    return digest.hexdigest()
