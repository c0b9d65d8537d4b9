"""Sealed delivery on the client side: asking for it, opening what comes back.

With a ``TransportKey`` the clients add ``seal-to`` (the fingerprint of our
registered transport certificate) to every DEK-returning request and open
the sealed key against what they themselves know: the operation, the id of
the request that was answered, our identity and the key's metadata. A key
that does not open raises SealedKeyError; nothing is handed out.
"""

from __future__ import annotations

import hmac
import ssl
from typing import TypeVar

from cryptography import x509

from kmipd.client._errors import KmipdError, SealedKeyError, TransportCertificateError
from kmipd.crypto import (
    HpkeError,
    TransportCertError,
    TransportKey,
    TransportTrust,
    certificate_fingerprint,
    check_transport_certificate,
    data_key_binding,
    dek_binding,
    delivery_info,
    parse_certificate,
)
from kmipd.protocol import (
    DataKeyResult,
    DekResult,
    SealedDataKeyResult,
    SealedDekResult,
    SealedUnwrapResult,
    TransportCertInfo,
    UnwrapResult,
)


class KeyDelivery:
    """How a client receives keys: in the clear inside TLS, or sealed to its transport key
    (``key``) and opened here. Both clients hold one, so neither branches on which."""

    def __init__(self, key: TransportKey | None) -> None:
        self.key = key

    @property
    def seal_to(self) -> bytes | None:
        """What DEK-returning requests carry as ``seal-to`` (None: clear delivery)."""
        return None if self.key is None else self.key.fingerprint

    def require_key(self, why: str) -> TransportKey:
        if self.key is None:
            raise KmipdError(why)
        return self.key

    def _open(
        self,
        key: TransportKey,
        sealed: bytes,
        operation: str,
        binding: list[object],
        *,
        server: str,
        request_id: int,
    ) -> bytes:
        """Open a sealed key against what we know of the request it answers."""
        info = delivery_info(operation, request_id, key.identity, key.fingerprint, binding)
        try:
            opened = key.open(sealed, info)
        except HpkeError as exc:
            raise SealedKeyError(
                f"the sealed key does not open: {exc}", server=server, request_id=request_id
            ) from None
        if len(opened) != 32:
            raise SealedKeyError(
                "the sealed key opened to something that is not a 256-bit key",
                server=server,
                request_id=request_id,
            )
        return opened

    def dek(
        self, result: DekResult | SealedDekResult, operation: str, *, server: str, request_id: int
    ) -> DekResult:
        if self.key is None:
            return _expect(result, DekResult, _UNASKED_SEALED, server, request_id)
        sealed = _expect(result, SealedDekResult, _UNSEALED, server, request_id)
        binding = dek_binding(sealed.dek_id, sealed.namespace, sealed.kek_version)
        key = self._open(
            self.key, sealed.sealed_key, operation, binding, server=server, request_id=request_id
        )
        return DekResult(
            dek_id=sealed.dek_id,
            namespace=sealed.namespace,
            kek_version=sealed.kek_version,
            key=key,
        )

    def data_key(
        self,
        result: DataKeyResult | SealedDataKeyResult,
        *,
        server: str,
        request_id: int,
    ) -> DataKeyResult:
        if self.key is None:
            return _expect(result, DataKeyResult, _UNASKED_SEALED, server, request_id)
        sealed = _expect(result, SealedDataKeyResult, _UNSEALED, server, request_id)
        binding = data_key_binding(sealed.blob, sealed.kek, sealed.kek_version)
        key = self._open(
            self.key,
            sealed.sealed_key,
            "generate-data-key",
            binding,
            server=server,
            request_id=request_id,
        )
        return DataKeyResult(
            key=key, blob=sealed.blob, kek=sealed.kek, kek_version=sealed.kek_version
        )

    def unwrapped(
        self,
        result: UnwrapResult | SealedUnwrapResult,
        blob: bytes,
        *,
        server: str,
        request_id: int,
    ) -> UnwrapResult:
        if self.key is None:
            return _expect(result, UnwrapResult, _UNASKED_SEALED, server, request_id)
        sealed = _expect(result, SealedUnwrapResult, _UNSEALED, server, request_id)
        binding = data_key_binding(blob, sealed.kek, sealed.kek_version)
        key = self._open(
            self.key, sealed.sealed_key, "unwrap", binding, server=server, request_id=request_id
        )
        return UnwrapResult(key=key, kek=sealed.kek, kek_version=sealed.kek_version)


_UNSEALED = "asked for a sealed key, got a clear one"
_UNASKED_SEALED = "asked for a key in the clear, got a sealed one"
_Result = TypeVar("_Result")


def _expect(
    result: object, expected: type[_Result], complaint: str, server: str, request_id: int
) -> _Result:
    if not isinstance(result, expected):
        raise SealedKeyError(complaint, server=server, request_id=request_id)
    return result


def client_ca_certificates(context: ssl.SSLContext) -> list[x509.Certificate]:
    """The CA certificates this client trusts for its daemon: they certify transport keys too."""
    return [x509.load_der_x509_certificate(der) for der in context.get_ca_certs(binary_form=True)]


def verify_fetched(
    info: TransportCertInfo, identity: str, cas: list[x509.Certificate], *, server: str
) -> x509.Certificate:
    """Check a fetched certificate on our side: our CA, the identity asked for, the rules.

    Revocation is the daemon's part (it re-checks the CRL on every fetch).
    """
    try:
        cert = parse_certificate(info.certificate)
    except TransportCertError as exc:
        raise TransportCertificateError(f"fetched certificate: {exc}", server=server) from None
    if not hmac.compare_digest(certificate_fingerprint(cert), info.fingerprint):
        raise TransportCertificateError(
            "fetched certificate does not match its fingerprint", server=server
        )
    problems = []
    for ca in cas:
        try:
            check_transport_certificate(cert, TransportTrust(ca), identity=identity)
        except TransportCertError as exc:
            problems.append(str(exc))
            continue
        return cert
    raise TransportCertificateError(
        f"the transport certificate of {identity} does not verify against this client's CA: "
        + ("; ".join(dict.fromkeys(problems)) or "no CA certificate loaded"),
        server=server,
    )
