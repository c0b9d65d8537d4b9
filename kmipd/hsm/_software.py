"""The embedded default backend: KEKs kept encrypted under a master key file.

This is a software stand-in for an HSM, for development and for
deployments that accept its limits: the KEKs are in this process's memory
while it runs, and anyone who can read both the master key file and the
keyring file can recover them. The master key file must be mode 0600; the
keyring holds each KEK sealed with AES-256-GCM under the master key, bound
to its handle, so a KEK entry copied under another handle fails to load.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmipd.crypto._private_files import PrivateFileError, read_private_file
from kmipd.hsm._interface import (
    HsmError,
    HsmIntegrityError,
    HsmKeyNotFoundError,
    HsmUnavailableError,
)
from kmipd.hsm._signing import (
    SigningPrivateKey,
    curve_of,
    generate_private_key,
    load_signing_key,
    public_key_der,
    sign_digest_with,
    signature_hash,
)
from kmipd.protocol import ProtocolError, decode_item, encode_deterministic, encode_item
from pki import write_private_file

MASTER_KEY_SIZE = 32
KEK_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
_KEYRING_FORMAT = "kmipd-software-keyring-v1"


def _kek_entry_aad(handle: str) -> bytes:
    return encode_deterministic(["kmipd/software-hsm/kek/v1", handle])


def _signing_entry_aad(handle: str) -> bytes:
    return encode_deterministic(["kmipd/software-hsm/signing-key/v1", handle])


def read_master_key(path: Path) -> bytes:
    """Read the master key, refusing a file others could read."""
    try:
        data = read_private_file(path, "master key file")
    except PrivateFileError as exc:
        raise HsmError(str(exc)) from None
    if len(data) != MASTER_KEY_SIZE:
        raise HsmError(f"master key file {path} must hold exactly {MASTER_KEY_SIZE} bytes")
    return data


def create_master_key(path: Path) -> None:
    """Write a fresh random master key (0600, atomically); refuse to replace one."""
    if path.exists():
        raise HsmError(f"master key file {path} already exists; refusing to replace it")
    write_private_file(path, secrets.token_bytes(MASTER_KEY_SIZE))


def read_keyring_file(keyring_path: Path) -> bytes | None:
    """The keyring file's bytes (sealed KEKs), read under its lock so no change is
    half-seen; None if there is no keyring yet. Blocks while a writer holds the lock."""
    lock_path = keyring_path.with_name(keyring_path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise HsmError(f"cannot open keyring lock {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return keyring_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HsmError(f"cannot read keyring {keyring_path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _parse_keyring(
    raw: bytes, keyring_path: Path, section: str = "keks"
) -> dict[str, dict[str, Any]]:
    """One section of the keyring: "keks", or "signing" (EC signing keys, absent in
    keyrings that never held one; a daemon that predates them ignores the section)."""
    try:
        doc = decode_item(raw)
        if doc.get("format") != _KEYRING_FORMAT:
            raise HsmError(f"keyring {keyring_path} has an unknown format")
        entries: dict[str, dict[str, Any]] = (
            doc["keks"] if section == "keks" else doc.get(section, {})
        )
    except (KeyError, TypeError, AttributeError, ProtocolError) as exc:
        raise HsmError(f"keyring {keyring_path} is malformed") from exc
    if not isinstance(entries, dict):
        raise HsmError(f"keyring {keyring_path} is malformed")
    return entries


def keyring_handles(raw: bytes, keyring_path: Path) -> frozenset[str]:
    """The handles of the KEKs a keyring file's bytes hold (still sealed)."""
    return frozenset(_parse_keyring(raw, keyring_path))


class _CheckRun:
    """One keyring read for check(); every check meanwhile waits for its outcome."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.problem: str | None = None


class SoftwareHsm:
    """KEKs sealed under the master key in one keyring file.

    Several daemons sharing a store on one host may share the keyring too:
    every change is a read-modify-write of the file under an exclusive lock
    (so none is lost), and a handle this process does not know yet is looked
    up in the file again before it is called unknown.
    """

    name = "software"

    def __init__(self, master_key: bytes, keyring_path: Path) -> None:
        self._master = AESGCM(master_key)
        self._keyring_path = keyring_path
        self._lock_path = keyring_path.with_name(keyring_path.name + ".lock")
        self._keks: dict[str, AESGCM] = self._open_all(self._read_entries())
        self._signers: dict[str, SigningPrivateKey] = self._open_signers(
            self._read_entries("signing")
        )
        self._check_run: _CheckRun | None = None

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

    def _read_entries(self, section: str = "keks") -> dict[str, dict[str, Any]]:
        try:
            raw = self._keyring_path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise HsmError(f"cannot read keyring {self._keyring_path}: {exc.strerror}") from None
        return _parse_keyring(raw, self._keyring_path, section)

    def _unseal(
        self, entries: dict[str, dict[str, Any]], aad: Callable[[str], bytes]
    ) -> dict[str, bytes]:
        """Every entry's sealed bytes opened under the master key, bound to its handle."""
        try:
            return {
                handle: self._master.decrypt(
                    entry["sealed"][:NONCE_SIZE], entry["sealed"][NONCE_SIZE:], aad(handle)
                )
                for handle, entry in entries.items()
            }
        except InvalidTag:
            raise HsmError(
                f"keyring {self._keyring_path} does not open with this master key "
                "(wrong master key file, or the keyring was altered)"
            ) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise HsmError(f"keyring {self._keyring_path} is malformed") from exc

    def _open_all(self, entries: dict[str, dict[str, Any]]) -> dict[str, AESGCM]:
        try:
            return {h: AESGCM(k) for h, k in self._unseal(entries, _kek_entry_aad).items()}
        except ValueError as exc:
            raise HsmError(f"keyring {self._keyring_path} is malformed") from exc

    def _open_signers(self, entries: dict[str, dict[str, Any]]) -> dict[str, SigningPrivateKey]:
        signers = {}
        for handle, der in self._unseal(entries, _signing_entry_aad).items():
            try:
                key = serialization.load_der_private_key(der, password=None)
            except (TypeError, ValueError) as exc:
                raise HsmError(f"keyring {self._keyring_path} is malformed") from exc
            if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
                raise HsmError(f"keyring {self._keyring_path}: {handle} is not an EC or RSA key")
            signers[handle] = key
        return signers

    def _change(
        self, edit: Callable[[dict[str, dict[str, Any]]], None], section: str = "keks"
    ) -> None:
        """Read-modify-write the keyring under an exclusive lock (runs on a worker thread)."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            sections = {"keks": self._read_entries(), "signing": self._read_entries("signing")}
            edit(sections[section])
            doc: dict[str, Any] = {"format": _KEYRING_FORMAT, "keks": sections["keks"]}
            if sections["signing"]:
                doc["signing"] = sections["signing"]
            write_private_file(self._keyring_path, encode_item(doc))
            self._keks = self._open_all(sections["keks"])
            self._signers = self._open_signers(sections["signing"])
        finally:
            os.close(fd)

    async def generate_kek(self, label: str) -> str:
        return await self.import_kek(label, secrets.token_bytes(KEK_SIZE))

    async def import_kek(self, label: str, material: bytes) -> str:
        if len(material) != KEK_SIZE:
            raise HsmError(f"a KEK must be {KEK_SIZE} bytes")
        handle = f"soft-{secrets.token_hex(12)}"
        nonce = os.urandom(NONCE_SIZE)
        sealed = nonce + self._master.encrypt(nonce, material, _kek_entry_aad(handle))
        entry = {"label": label, "created": int(time.time()), "sealed": sealed}
        await trio.to_thread.run_sync(self._change, lambda entries: entries.update({handle: entry}))
        return handle

    def _kek(self, handle: str) -> AESGCM:
        kek = self._keks.get(handle)
        if kek is None:
            # Perhaps another daemon sharing the keyring created it since.
            self._keks = self._open_all(self._read_entries())
            kek = self._keks.get(handle)
        if kek is None:
            raise HsmKeyNotFoundError(f"no KEK with handle {handle!r} in the software HSM")
        return kek

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
        def remove(entries: dict[str, dict[str, Any]]) -> None:
            if entries.pop(handle, None) is None:
                raise HsmKeyNotFoundError(f"no KEK with handle {handle!r} in the software HSM")

        await trio.to_thread.run_sync(self._change, remove)

    # -- signing keys (the online CA's): EC private keys sealed like KEKs ---------------

    async def generate_signing_key(self, label: str, curve: str) -> str:
        # RSA-4096 generation takes a second or more: off the trio thread.
        key = await trio.to_thread.run_sync(generate_private_key, curve)
        return await self._store_signer(label, key)

    async def import_signing_key(self, label: str, private_key_der: bytes) -> str:
        return await self._store_signer(label, load_signing_key(private_key_der))

    async def _store_signer(self, label: str, key: SigningPrivateKey) -> str:
        handle = f"soft-sign-{secrets.token_hex(12)}"
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        nonce = os.urandom(NONCE_SIZE)
        sealed = nonce + self._master.encrypt(nonce, der, _signing_entry_aad(handle))
        entry = {"label": label, "created": int(time.time()), "sealed": sealed}
        await trio.to_thread.run_sync(
            self._change, lambda entries: entries.update({handle: entry}), "signing"
        )
        return handle

    def _signer(self, handle: str) -> SigningPrivateKey:
        key = self._signers.get(handle)
        if key is None:
            self._signers = self._open_signers(self._read_entries("signing"))
            key = self._signers.get(handle)
        if key is None:
            raise HsmKeyNotFoundError(f"no signing key with handle {handle!r} in the software HSM")
        return key

    async def signing_public_key(self, handle: str) -> bytes:
        return public_key_der(self._signer(handle))

    async def sign(self, handle: str, data: bytes) -> bytes:
        key = self._signer(handle)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise HsmError(f"signing key {handle} is RSA: it signs digests (sign_digest)")
        return key.sign(data, ec.ECDSA(signature_hash(curve_of(key))))

    async def sign_digest(self, handle: str, digest: bytes, algorithm: str) -> bytes:
        return sign_digest_with(self._signer(handle), algorithm, digest)

    async def destroy_signing_key(self, handle: str) -> None:
        def remove(entries: dict[str, dict[str, Any]]) -> None:
            if entries.pop(handle, None) is None:
                raise HsmKeyNotFoundError(
                    f"no signing key with handle {handle!r} in the software HSM"
                )

        await trio.to_thread.run_sync(self._change, remove, "signing")

    async def check(self) -> None:
        """Read the keyring file under its lock: a keyring that cannot be read (a dead
        file system, a lock held forever by a wedged process) makes this hang or fail,
        and the daemon's watchdog then stops vouching for it.

        One read at a time: while a read hangs, later checks wait for that same
        read instead of each leaving another worker thread stuck behind it.
        """
        run = self._check_run
        if run is None:
            run = self._check_run = _CheckRun()
            trio.lowlevel.spawn_system_task(self._read_keyring_for_check, run)
        await run.done.wait()
        if run.problem is not None:
            raise HsmUnavailableError(run.problem)

    async def _read_keyring_for_check(self, run: _CheckRun) -> None:
        def read_and_parse() -> None:
            data = read_keyring_file(self._keyring_path)
            if data is not None:
                _parse_keyring(data, self._keyring_path)

        try:
            # Abandoned (not waited for) only when the whole run ends.
            await trio.to_thread.run_sync(read_and_parse, abandon_on_cancel=True)
        except HsmError as exc:
            run.problem = str(exc)
        except Exception as exc:  # a system task must not raise: report it as the check's
            run.problem = f"keyring check failed: {exc!r}"
        finally:
            self._check_run = None
            run.done.set()

    def close(self) -> None:
        self._keks.clear()
        self._signers.clear()
