"""The embedded default backend: KEKs kept encrypted under a master key file.

This is a software stand-in for an HSM, for development and for
deployments that accept its limits: the KEKs are in this process's memory
while it runs, and anyone who can read both the master key file and the
keyring can recover them. The master key file must be mode 0600; the
keyring holds each KEK sealed with AES-256-GCM under the master key, bound
to its handle, so a KEK entry copied under another handle fails to load.

The keyring is a file (one host), or a table that someone else keeps (the
PostgreSQL store's, shared by every daemon given the same master key, as
Vault's nodes share an unseal key): see KeyringTable.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

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


#: The entry of a shared keyring that says which master key seals it: the first daemon
#: writes it, every later one must open it (a daemon given another master key would
#: otherwise seal KEKs nobody else can open).
_CHECK_HANDLE = "master-key-check"
_CHECK_AAD = encode_deterministic(["kmipd/software-hsm/master-key-check/v1"])


def master_key_opens(master_key: bytes, proof: bytes) -> bool:
    """Whether a shared keyring's master key check opens with this master key."""
    return _check_opens(AESGCM(master_key), proof)


def _check_opens(master: AESGCM, proof: bytes) -> bool:
    try:
        return master.decrypt(proof[:NONCE_SIZE], proof[NONCE_SIZE:], _CHECK_AAD) == b""
    except (InvalidTag, ValueError):
        return False


def reseal_entry(
    old_master: bytes, new_master: bytes, kind: str, handle: str, sealed: bytes
) -> bytes:
    """A shared keyring's entry sealed again under a new master key (``kmipd hsm rekey``);
    HsmError if it does not open with ``old_master``."""
    aads = {"kek": _kek_entry_aad, "signing": _signing_entry_aad}
    aad = _CHECK_AAD if kind == "check" else aads[kind](handle) if kind in aads else None
    if aad is None:
        raise HsmError(f"keyring entry {handle} has an unknown kind {kind!r}")
    try:
        opened = AESGCM(old_master).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
    except (InvalidTag, ValueError):
        raise HsmError(
            f"keyring entry {handle} does not open with the current master key"
        ) from None
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(new_master).encrypt(nonce, opened, aad)


class KeyringTable(Protocol):
    """Sealed keyring entries kept by someone else, shared by several daemons (the
    PostgreSQL store's, through kmipd.daemon). Entries are sealed before they get here
    and opened after they leave: the table never sees a key. Each call may wait for
    the database; failures raise HsmUnavailableError (or HsmError)."""

    #: Where the entries are, for messages ("the PostgreSQL store at host=...").
    where: str

    async def entries(self, kind: str) -> dict[str, bytes]:
        """Every sealed entry of ``kind`` ("kek", "signing", "check"), by handle."""
        ...

    async def entry(self, kind: str, handle: str) -> bytes | None: ...

    async def add(self, kind: str, handle: str, label: str, sealed: bytes) -> bool:
        """False if the handle is taken (nothing changed)."""
        ...

    async def remove(self, kind: str, handle: str) -> bool:
        """False if there was no such entry."""
        ...

    def on_removed(self, callback: Callable[[str | None], None]) -> None:
        """Have ``callback`` told (from any thread) each handle removed, by any daemon,
        and None when removals may have been missed."""
        ...

    def close(self) -> None: ...


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
    """KEKs sealed under the master key in one keyring: a file, or a shared table.

    Several daemons sharing a store on one host may share the keyring file:
    every change is a read-modify-write of the file under an exclusive lock
    (so none is lost), and a handle this process does not know yet is looked
    up in the file again before it is called unknown.

    With a KeyringTable (``open_shared``), each entry is one row: creating
    and destroying are single inserts and deletes, so daemons on several
    machines never overwrite each other's entries; a handle this daemon does
    not hold yet is fetched from the table (off the event loop), and one
    another daemon destroyed is dropped from memory when the table says so.
    """

    name = "software"

    def __init__(
        self, master_key: bytes, keyring_path: Path | None, *, table: KeyringTable | None = None
    ) -> None:
        self._master = AESGCM(master_key)
        self._table = table
        # With a table there is no file: these paths are never opened then.
        self._keyring_path = keyring_path or Path("no-keyring-file")
        self._lock_path = self._keyring_path.with_name(self._keyring_path.name + ".lock")
        self._where = (
            f"keyring {keyring_path}" if table is None else f"the keyring in {table.where}"
        )
        self._check_run: _CheckRun | None = None
        #: Bumped by every removal the table reports: an entry fetched meanwhile may be
        #: the one removed, so it is used that once but not kept.
        self._removals = 0
        self._keks: dict[str, AESGCM] = {}
        self._signers: dict[str, SigningPrivateKey] = {}
        if table is None:
            self._keks = self._open_all(_sealed(self._read_entries(), self._where))
            self._signers = self._open_signers(_sealed(self._read_entries("signing"), self._where))
        else:
            table.on_removed(self._forget)

    @classmethod
    def open(
        cls, master_key_path: Path, keyring_path: Path, *, create: bool = False
    ) -> SoftwareHsm:
        """Open the backend; with ``create``, make a master key if there is none yet."""
        if create and not master_key_path.exists():
            create_master_key(master_key_path)
        return cls(read_master_key(master_key_path), keyring_path)

    @classmethod
    async def open_shared(cls, master_key_path: Path, table: KeyringTable) -> SoftwareHsm:
        """The backend over a shared keyring table; refuses a master key other than the
        one its entries are sealed under (HsmError). Closing it closes the table."""
        try:
            hsm = cls(read_master_key(master_key_path), None, table=table)
            await hsm._claim_master_key(table)
            hsm._keks = hsm._open_all(await table.entries("kek"))
            hsm._signers = hsm._open_signers(await table.entries("signing"))
        except BaseException:
            table.close()
            raise
        return hsm

    async def _claim_master_key(self, table: KeyringTable) -> None:
        """The table's master key check: written by the first daemon, opened by all."""
        found = await table.entry("check", _CHECK_HANDLE)
        if found is None:
            nonce = os.urandom(NONCE_SIZE)
            proof = nonce + self._master.encrypt(nonce, b"", _CHECK_AAD)
            # Two first daemons at once: one insert wins, and both read the winner's.
            await table.add("check", _CHECK_HANDLE, "master key check", proof)
            found = await table.entry("check", _CHECK_HANDLE)
        if found is None or not _check_opens(self._master, found):
            raise HsmError(
                f"{self._where} is sealed under another master key: every daemon on one "
                "store must be given the same hsm.master_key"
            )

    def __repr__(self) -> str:
        return f"SoftwareHsm({self._where!r}, keks={len(self._keks)})"

    def _read_entries(self, section: str = "keks") -> dict[str, dict[str, Any]]:
        try:
            raw = self._keyring_path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise HsmError(f"cannot read keyring {self._keyring_path}: {exc.strerror}") from None
        return _parse_keyring(raw, self._keyring_path, section)

    def _unseal(self, sealed: dict[str, bytes], aad: Callable[[str], bytes]) -> dict[str, bytes]:
        """Every entry's sealed bytes opened under the master key, bound to its handle."""
        try:
            return {
                handle: self._master.decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], aad(handle))
                for handle, data in sealed.items()
            }
        except InvalidTag:
            raise HsmError(
                f"{self._where} does not open with this master key "
                "(wrong master key file, or the keyring was altered)"
            ) from None
        except (TypeError, ValueError) as exc:
            raise HsmError(f"{self._where} is malformed") from exc

    def _open_all(self, sealed: dict[str, bytes]) -> dict[str, AESGCM]:
        try:
            return {h: AESGCM(k) for h, k in self._unseal(sealed, _kek_entry_aad).items()}
        except ValueError as exc:
            raise HsmError(f"{self._where} is malformed") from exc

    def _open_signers(self, sealed: dict[str, bytes]) -> dict[str, SigningPrivateKey]:
        signers = {}
        for handle, der in self._unseal(sealed, _signing_entry_aad).items():
            try:
                key = serialization.load_der_private_key(der, password=None)
            except (TypeError, ValueError) as exc:
                raise HsmError(f"{self._where} is malformed") from exc
            if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
                raise HsmError(f"{self._where}: {handle} is not an EC or RSA key")
            signers[handle] = key
        return signers

    def _change(
        self, edit: Callable[[dict[str, dict[str, Any]]], None], section: str = "keks"
    ) -> None:
        """Read-modify-write the keyring file under an exclusive lock (on a worker thread)."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            sections = {"keks": self._read_entries(), "signing": self._read_entries("signing")}
            edit(sections[section])
            doc: dict[str, Any] = {"format": _KEYRING_FORMAT, "keks": sections["keks"]}
            if sections["signing"]:
                doc["signing"] = sections["signing"]
            write_private_file(self._keyring_path, encode_item(doc))
            self._keks = self._open_all(_sealed(sections["keks"], self._where))
            self._signers = self._open_signers(_sealed(sections["signing"], self._where))
        finally:
            os.close(fd)

    async def _add(self, kind: str, handle: str, label: str, sealed: bytes) -> None:
        """A new entry in the keyring, sealed already; ``handle`` is fresh and random."""
        if self._table is not None:
            if not await self._table.add(kind, handle, label, sealed):
                raise HsmError(f"{self._where} already holds an entry {handle}")
            return
        entry = {"label": label, "created": int(time.time()), "sealed": sealed}
        await trio.to_thread.run_sync(
            self._change,
            lambda entries: entries.update({handle: entry}),
            "keks" if kind == "kek" else "signing",
        )

    async def _remove(self, kind: str, handle: str, what: str) -> None:
        missing = f"no {what} with handle {handle!r} in the software HSM"
        if self._table is not None:
            removed = await self._table.remove(kind, handle)
            self._keks.pop(handle, None)
            self._signers.pop(handle, None)
            if not removed:
                raise HsmKeyNotFoundError(missing)
            return

        def remove(entries: dict[str, dict[str, Any]]) -> None:
            if entries.pop(handle, None) is None:
                raise HsmKeyNotFoundError(missing)

        await trio.to_thread.run_sync(self._change, remove, "keks" if kind == "kek" else "signing")

    def _forget(self, handle: str | None) -> None:
        """The table's word (on its listener thread): another daemon removed ``handle``,
        or removals may have been missed (None): drop it, or everything, from memory;
        what is still in the table is fetched again when next used."""
        self._removals += 1
        if handle is None:
            self._keks, self._signers = {}, {}
        else:
            self._keks.pop(handle, None)
            self._signers.pop(handle, None)

    async def generate_kek(self, label: str) -> str:
        return await self.import_kek(label, secrets.token_bytes(KEK_SIZE))

    async def import_kek(self, label: str, material: bytes) -> str:
        if len(material) != KEK_SIZE:
            raise HsmError(f"a KEK must be {KEK_SIZE} bytes")
        handle = f"soft-{secrets.token_hex(12)}"
        nonce = os.urandom(NONCE_SIZE)
        sealed = nonce + self._master.encrypt(nonce, material, _kek_entry_aad(handle))
        await self._add("kek", handle, label, sealed)
        if self._table is not None:
            self._keks[handle] = AESGCM(material)
        return handle

    def _kek(self, handle: str) -> AESGCM:
        kek = self._keks.get(handle)
        if kek is None and self._table is None:
            # Perhaps another daemon sharing the keyring created it since.
            self._keks = self._open_all(_sealed(self._read_entries(), self._where))
            kek = self._keks.get(handle)
        if kek is None:
            raise HsmKeyNotFoundError(f"no KEK with handle {handle!r} in the software HSM")
        return kek

    async def _kek_fetched(self, handle: str) -> AESGCM:
        """The KEK; from the table if this daemon does not hold it yet (another made it)."""
        if self._table is None or handle in self._keks:
            return self._kek(handle)
        removals = self._removals
        sealed = await self._table.entry("kek", handle)
        if sealed is None:
            raise HsmKeyNotFoundError(f"no KEK with handle {handle!r} in the software HSM")
        kek = self._open_all({handle: sealed})[handle]
        if removals == self._removals:
            self._keks[handle] = kek
        return kek

    async def wrap(self, handle: str, key: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + (await self._kek_fetched(handle)).encrypt(nonce, key, associated_data)

    async def unwrap(self, handle: str, wrapped: bytes, associated_data: bytes) -> bytes:
        return _unwrap_with(await self._kek_fetched(handle), wrapped, associated_data)

    def unwrap_now(self, handle: str, wrapped: bytes, associated_data: bytes) -> bytes | None:
        """In-process AES-GCM: microseconds, so answered at once, unless the KEK must
        first be fetched from a shared table (None: the caller awaits ``unwrap``)."""
        if self._table is not None and handle not in self._keks:
            return None
        return _unwrap_with(self._kek(handle), wrapped, associated_data)

    async def destroy_kek(self, handle: str) -> None:
        await self._remove("kek", handle, "KEK")

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
        await self._add("signing", handle, label, sealed)
        if self._table is not None:
            self._signers[handle] = key
        return handle

    async def _signer(self, handle: str) -> SigningPrivateKey:
        key = self._signers.get(handle)
        if key is None and self._table is None:
            self._signers = self._open_signers(_sealed(self._read_entries("signing"), self._where))
            key = self._signers.get(handle)
        elif key is None and self._table is not None:
            removals = self._removals
            sealed = await self._table.entry("signing", handle)
            if sealed is not None:
                key = self._open_signers({handle: sealed})[handle]
                if removals == self._removals:
                    self._signers[handle] = key
        if key is None:
            raise HsmKeyNotFoundError(f"no signing key with handle {handle!r} in the software HSM")
        return key

    async def signing_public_key(self, handle: str) -> bytes:
        return public_key_der(await self._signer(handle))

    async def sign(self, handle: str, data: bytes) -> bytes:
        key = await self._signer(handle)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise HsmError(f"signing key {handle} is RSA: it signs digests (sign_digest)")
        return key.sign(data, ec.ECDSA(signature_hash(curve_of(key))))

    async def sign_digest(self, handle: str, digest: bytes, algorithm: str) -> bytes:
        return sign_digest_with(await self._signer(handle), algorithm, digest)

    async def destroy_signing_key(self, handle: str) -> None:
        await self._remove("signing", handle, "signing key")

    async def check(self) -> None:
        """Read the keyring under its lock (or the table's check entry): a keyring that
        cannot be read (a dead file system, a lock held forever by a wedged process, a
        database down) makes this hang or fail, and the daemon's watchdog then stops
        vouching for it.

        One read at a time: while a read hangs, later checks wait for that same
        read instead of each leaving another worker thread stuck behind it.
        """
        if self._table is not None:
            try:
                found = await self._table.entry("check", _CHECK_HANDLE)
            except HsmError as exc:
                raise HsmUnavailableError(str(exc)) from None
            if found is None:
                raise HsmUnavailableError(f"{self._where} lost its master key check")
            return
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
        if self._table is not None:
            self._table.close()


def _sealed(entries: dict[str, dict[str, Any]], where: str) -> dict[str, bytes]:
    """A keyring file section's sealed bytes, by handle."""
    try:
        return {handle: bytes(entry["sealed"]) for handle, entry in entries.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise HsmError(f"{where} is malformed") from exc


def _unwrap_with(kek: AESGCM, wrapped: bytes, associated_data: bytes) -> bytes:
    if len(wrapped) < NONCE_SIZE + TAG_SIZE:
        raise HsmIntegrityError("wrapped key is too short to be valid")
    try:
        return kek.decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], associated_data)
    except InvalidTag:
        raise HsmIntegrityError(
            "wrapped key failed authentication (wrong KEK or metadata, or tampered)"
        ) from None
