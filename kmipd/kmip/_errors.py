"""KMIP errors: a refusal always carries the Result Reason the response gives."""

from __future__ import annotations

import enum


class ResultReason(enum.IntEnum):
    """The KMIP Result Reason enumeration (the subset kmipd answers with)."""

    ITEM_NOT_FOUND = 0x01
    RESPONSE_TOO_LARGE = 0x02
    AUTHENTICATION_NOT_SUCCESSFUL = 0x03
    INVALID_MESSAGE = 0x04
    OPERATION_NOT_SUPPORTED = 0x05
    MISSING_DATA = 0x06
    INVALID_FIELD = 0x07
    FEATURE_NOT_SUPPORTED = 0x08
    CRYPTOGRAPHIC_FAILURE = 0x0A
    ILLEGAL_OPERATION = 0x0B
    PERMISSION_DENIED = 0x0C
    INDEX_OUT_OF_BOUNDS = 0x0E
    KEY_FORMAT_TYPE_NOT_SUPPORTED = 0x10
    OBJECT_ALREADY_EXISTS = 0x18
    GENERAL_FAILURE = 0x100


class ResultStatus(enum.IntEnum):
    SUCCESS = 0
    OPERATION_FAILED = 1
    OPERATION_PENDING = 2
    OPERATION_UNDONE = 3


class KmipError(Exception):
    """A KMIP request (or part of one) that is refused with ``reason``.

    Like the native ProtocolError, the message names fields and sizes, never
    values taken from the input: input may be key material.
    """

    def __init__(self, reason: ResultReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.name}, {self.message!r})"


class KmipCodecError(KmipError):
    """Bytes that are not well-formed TTLV, or a message that breaks KMIP's structure."""
