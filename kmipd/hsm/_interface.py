"""The one interface every HSM backend implements.

A KEK never leaves its backend: the service only holds an opaque handle
and asks the backend to wrap or unwrap a DEK under it. Every method is
async so that a backend whose token blocks (PKCS#11) can run its calls on
its own worker with a timeout, while the software backend answers inline.

Wrapped-key format, shared by every backend that uses AES-256-GCM so that
a store can move between them: ``nonce (12 bytes) || ciphertext || tag (16 bytes)``,
with the caller's associated data binding the key to its metadata.
"""

from __future__ import annotations

from typing import Protocol


class HsmError(Exception):
    """Base class for backend failures. Messages never contain key material."""


class HsmIntegrityError(HsmError):
    """Unwrap failed authentication: wrong KEK, wrong associated data, or tampering."""


class HsmUnavailableError(HsmError):
    """The backend cannot be reached or did not answer in time."""


class HsmKeyNotFoundError(HsmError):
    """No KEK with that handle exists in the backend."""


class HsmBackend(Protocol):
    #: Short name for status and logs, e.g. "software" or "pkcs11".
    name: str

    async def generate_kek(self, label: str) -> str:
        """Create a new 256-bit KEK inside the backend and return its handle."""
        ...

    async def import_kek(self, label: str, material: bytes) -> str:
        """Store an existing 256-bit KEK (a migration, a test vector); return its handle.

        The backend then treats it like one it generated: it never leaves again.
        """
        ...

    async def wrap(self, handle: str, key: bytes, associated_data: bytes) -> bytes:
        """Encrypt ``key`` under the KEK, authenticating ``associated_data``."""
        ...

    async def unwrap(self, handle: str, wrapped: bytes, associated_data: bytes) -> bytes:
        """Reverse ``wrap``; raise HsmIntegrityError if anything does not match."""
        ...

    def unwrap_now(self, handle: str, wrapped: bytes, associated_data: bytes) -> bytes | None:
        """``unwrap`` without blocking, if this backend can answer in microseconds.

        None means "not without waiting": the caller then awaits ``unwrap``.
        Raises the same errors as ``unwrap``.
        """
        ...

    async def destroy_kek(self, handle: str) -> None:
        """Erase the KEK: every key wrapped only under it becomes unrecoverable."""
        ...

    async def generate_signing_key(self, label: str, curve: str) -> str:
        """Create a signing key pair inside the backend: ``curve`` is a key type,
        p256, p384 (EC), rsa3072 or rsa4096 (RSA; ``sign_digest`` only).

        The private half signs and does nothing else (no decrypt, unwrap or
        derive), and never leaves the backend; returns its handle.
        """
        ...

    async def import_signing_key(self, label: str, private_key_der: bytes) -> str:
        """Store an existing EC private key (PKCS#8 DER) as a signing key; its handle."""
        ...

    async def signing_public_key(self, handle: str) -> bytes:
        """The signing key's public half, SubjectPublicKeyInfo DER."""
        ...

    async def sign(self, handle: str, data: bytes) -> bytes:
        """ECDSA over ``data`` (SHA-256 for P-256, SHA-384 for P-384), DER-encoded."""
        ...

    async def sign_digest(self, handle: str, digest: bytes, algorithm: str) -> bytes:
        """Sign a digest the caller computed, under ``algorithm`` (ES256, ES384, PS256,
        PS384, RS256, RS384: see kmipd.hsm._signing); a digest whose length is not its
        hash's is refused (DigestLengthError), as is an algorithm the key does not
        sign with (SignatureAlgorithmError)."""
        ...

    async def destroy_signing_key(self, handle: str) -> None:
        """Erase the key pair: nothing signs with it again."""
        ...

    async def check(self) -> None:
        """Raise HsmUnavailableError unless the backend answers now."""
        ...

    def close(self) -> None: ...
