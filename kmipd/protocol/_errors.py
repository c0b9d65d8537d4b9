"""Wire error codes: stable numbers and names, shared by every side of the protocol.

The numbers are part of the protocol (conformance/protocol.cddl lists them);
never renumber one. Codes below 100 are about the message or the connection,
the 100s about who may do what, the 200s about keys, the 300s about the
server's own condition.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    BAD_REQUEST = 1
    UNSUPPORTED_VERSION = 2
    HELLO_REQUIRED = 3
    UNKNOWN_OPERATION = 4
    FRAME_TOO_LARGE = 5
    DUPLICATE_REQUEST_ID = 6
    TIMEOUT = 7

    CERTIFICATE_REJECTED = 100
    NOT_AUTHORIZED = 101
    #: Sent on an open connection whose peer certificate was revoked, expired
    #: or stopped chaining to the trusted CA since its handshake.
    CERTIFICATE_REVOKED = 102

    NOT_FOUND = 200
    INTEGRITY_FAILURE = 201
    ALREADY_EXISTS = 202
    WRONG_STATE = 203
    USAGE_NOT_PERMITTED = 204
    KEY_NOT_ACTIVE = 205
    KEY_DEACTIVATED = 206
    PROTECT_STOP_PASSED = 207
    KEY_COMPROMISED = 208
    KEY_DESTROYED = 209
    DEPENDENTS_EXIST = 210
    DESTROY_PENDING = 211
    #: 22x: key transport (sealed delivery, transport certificates).
    TRANSPORT_CERTIFICATE_REJECTED = 220
    NO_TRANSPORT_CERTIFICATE = 221
    SEALED_DELIVERY_REQUIRED = 222
    #: 23x: secrets.
    SECRET_DISABLED = 230
    SECRET_EXPIRED = 231
    SECRET_NOT_YET_VALID = 232
    SECRET_TOO_LARGE = 233
    UNKNOWN_SECRET_VERSION = 234
    SECRET_DELETED = 235
    #: 24x: certificates from the online CA.
    #: The CSR names a SPIFFE ID other than the caller's own.
    CERTIFICATE_IDENTITY_MISMATCH = 240
    #: A DNS name outside the grant's patterns, or serverAuth without such a grant.
    CERTIFICATE_NAME_NOT_ALLOWED = 241
    CERTIFICATE_VALIDITY_TOO_LONG = 242
    #: The CSR's key type is weak or not among the grant's key_types.
    CERTIFICATE_KEY_NOT_ALLOWED = 243
    #: A renewal's CSR carries the key of the certificate it renews.
    CERTIFICATE_KEY_REUSED = 244
    #: The CSR is malformed, or its signature does not verify (no proof of possession).
    CSR_INVALID = 245
    #: This daemon has no online CA ([online_ca] is not configured).
    NO_ONLINE_CA = 246
    #: renew-certificate: the caller's certificate was not issued by the online CA.
    CERTIFICATE_NOT_RENEWABLE = 247
    #: 25x: managed signing keys (one purpose per key, NIST SP 800-57).
    #: A signing key was asked to decrypt, unwrap or be read as a DEK: it only signs.
    SIGNING_KEY_ONLY = 254
    #: A KEK, DEK or key-transport key was asked to sign: only signing keys sign.
    NOT_A_SIGNING_KEY = 255
    #: The digest's length is not its algorithm's hash length: nothing was signed.
    DIGEST_LENGTH_MISMATCH = 256
    #: The signature algorithm is unknown, or not one the key's type signs with.
    UNSUPPORTED_ALGORITHM = 257
    #: The key's signing period (its private half's crypto-period) ended: it only verifies.
    SIGNING_PERIOD_ENDED = 258
    #: Managed certificates (Key Vault style, kmipd.service._managed).
    #: A policy field that cannot be used (key type, names, validity, lifetime action).
    CERTIFICATE_POLICY_INVALID = 248
    #: The managed certificate is soft-deleted: recover it first.
    MANAGED_CERTIFICATE_DELETED = 249
    UNKNOWN_CERTIFICATE_VERSION = 250
    #: An import whose certificate, key or chain cannot be used (mismatch, expired, malformed).
    CERTIFICATE_IMPORT_INVALID = 251
    #: The private key was asked for, but the certificate's policy keeps it in the daemon.
    KEY_NOT_EXPORTABLE = 252

    BUSY = 300
    SHUTTING_DOWN = 301
    HSM_UNAVAILABLE = 302
    INTERNAL = 303
    AUDIT_UNAVAILABLE = 304
    #: The store cannot write (disk full, read-only, locked, damaged): not applied.
    STORE_UNAVAILABLE = 305
    #: The store's connection broke during COMMIT: the write may or may not be applied.
    STORE_OUTCOME_UNKNOWN = 306

    @property
    def wire_name(self) -> str:
        """The name sent beside the number, e.g. ``not-found``."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_wire_name(cls, name: str) -> ErrorCode:
        return cls[name.upper().replace("-", "_")]


#: Errors after which the server closes the connection: framing is broken
#: (we no longer know where the next frame starts) or the peer was refused.
CONNECTION_FATAL = frozenset(
    {
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.TIMEOUT,
        ErrorCode.CERTIFICATE_REJECTED,
        ErrorCode.CERTIFICATE_REVOKED,
    }
)


class ProtocolError(Exception):
    """A message or frame that breaks the protocol.

    ``request_id`` is set when the offending message could still be
    attributed to a request, so the error response can echo it.
    The message never contains values taken from the peer's input beyond
    field names and sizes: input may be key material.
    """

    def __init__(self, code: ErrorCode, message: str, *, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"ProtocolError({self.code.wire_name}, {self.message!r}, request_id={self.request_id})"
        )
