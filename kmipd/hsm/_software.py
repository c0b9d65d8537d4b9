"""The embedded default backend: KEKs kept encrypted under a master key file.

This is a software stand-in for an HSM, for development and for
deployments that accept its limits: the KEKs are in this process's memory
while it runs, and anyone who can read both the master key file and the
keyring file can recover them. The master key file must be mode 0600; the
keyring holds each KEK sealed with AES-256-GCM under the master key, bound
to its handle, so a KEK entry copied under another handle fails to load.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmipd.hsm._interface import HsmError, HsmIntegrityError, HsmKeyNotFoundError
from kmipd.protocol import decode_item, encode_deterministic, encode_item
from pki import write_private_file

MASTER_KEY_SIZE = 32
KEK_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
_KEYRING_FORMAT = "kmipd-software-keyring-v1"


def _kek_entry_aad(handle: str) -> bytes:
    return encode_deterministic(["kmipd/software-hsm/kek/v1", handle])


def read_master_key(path: Path) -> bytes:
    """Read the master key, refusing a file others could read."""
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise HsmError(f"cannot read master key file {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise HsmError(
            f"master key file {path} is accessible to group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); it must be 0600"
        )
    if len(data) != MASTER_KEY_SIZE:
        raise HsmError(f"master key file {path} must hold exactly {MASTER_KEY_SIZE} bytes")
    return data


def create_master_key(path: Path) -> None:
    """Write a fresh random master key (0600, atomically); refuse to replace one."""
    if path.exists():
        raise HsmError(f"master key file {path} already exists; refusing to replace it")
    write_private_file(path, secrets.token_bytes(MASTER_KEY_SIZE))


class SoftwareHsm:
    name = "software"

    def __init__(self, master_key: bytes, keyring_path: Path) -> None:
        self._master = AESGCM(master_key)
        self._keyring_path = keyring_path
        self._entries: dict[str, dict[str, Any]] = {}
        self._keks: dict[str, AESGCM] = {}
        self._write_lock = trio.Lock()
        self._load()

    @classmethod
    def open(
        cls, master_key_path: Path, keyring_path: Path, *, create: bool = False
    ) -> SoftwareHsm:
        """Open the backend; with ``create``, make a master key if there is none yet."""
        if create and not master_key_path.exists():
            create_master_key(master_key_path)
        return cls(read_master_key(master_key_path), keyring_path)

    def __repr__(self) -> str:
        return f"SoftwareHsm(keyring={str(self._keyring_path)!r}, keks={len(self._keks)})"

    def _load(self) -> None:
        try:
            raw = self._keyring_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise HsmError(f"cannot read keyring {self._keyring_path}: {exc.strerror}") from None
        try:
            doc = decode_item(raw)
            if doc.get("format") != _KEYRING_FORMAT:
                raise HsmError(f"keyring {self._keyring_path} has an unknown format")
            entries: dict[str, dict[str, Any]] = doc["keks"]
            for handle, entry in entries.items():
                material = self._master.decrypt(
                    entry["sealed"][:NONCE_SIZE],
                    entry["sealed"][NONCE_SIZE:],
                    _kek_entry_aad(handle),
                )
                self._keks[handle] = AESGCM(material)
        except InvalidTag:
            raise HsmError(
                f"keyring {self._keyring_path} does not open with this master key "
                "(wrong master key file, or the keyring was altered)"
            ) from None
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise HsmError(f"keyring {self._keyring_path} is malformed") from exc
        self._entries = entries

    async def _save(self, entries: dict[str, dict[str, Any]]) -> None:
        data = encode_item({"format": _KEYRING_FORMAT, "keks": entries})
        await trio.to_thread.run_sync(write_private_file, self._keyring_path, data)

    async def generate_kek(self, label: str) -> str:
        handle = f"soft-{secrets.token_hex(12)}"
        material = secrets.token_bytes(KEK_SIZE)
        nonce = os.urandom(NONCE_SIZE)
        sealed = nonce + self._master.encrypt(nonce, material, _kek_entry_aad(handle))
        async with self._write_lock:
            entries = dict(self._entries)
            entries[handle] = {"label": label, "created": int(time.time()), "sealed": sealed}
            await self._save(entries)
            self._entries = entries
            self._keks[handle] = AESGCM(material)
        return handle

    def _kek(self, handle: str) -> AESGCM:
        try:
            return self._keks[handle]
        except KeyError:
            raise HsmKeyNotFoundError(
                f"no KEK with handle {handle!r} in the software HSM"
            ) from None

    async def wrap(self, handle: str, key: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._kek(handle).encrypt(nonce, key, associated_data)

    async def unwrap(self, handle: str, wrapped: bytes, associated_data: bytes) -> bytes:
        return self.unwrap_now(handle, wrapped, associated_data)

    def unwrap_now(self, handle: str, wrapped: bytes, associated_data: bytes) -> bytes:
        """In-process AES-GCM: microseconds, so always answered at once."""
        kek = self._kek(handle)
        if len(wrapped) < NONCE_SIZE + TAG_SIZE:
            raise HsmIntegrityError("wrapped key is too short to be valid")
        try:
            return kek.decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], associated_data)
        except InvalidTag:
            raise HsmIntegrityError(
                "wrapped key failed authentication (wrong KEK or metadata, or tampered)"
            ) from None

    async def destroy_kek(self, handle: str) -> None:
        async with self._write_lock:
            if handle not in self._entries:
                raise HsmKeyNotFoundError(f"no KEK with handle {handle!r} in the software HSM")
            entries = {h: e for h, e in self._entries.items() if h != handle}
            await self._save(entries)
            self._entries = entries
            self._keks.pop(handle, None)

    async def check(self) -> None:
        """The software backend is in-process: it answers whenever the process does."""

    def close(self) -> None:
        self._keks.clear()
