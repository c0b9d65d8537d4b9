"""The key store: only wrapped keys and their metadata, never a plaintext key."""

from kmipd.store._sqlite import (
    AlreadyExistsError,
    DekRecord,
    KekRecord,
    KekVersion,
    KeyStore,
    StoreError,
)

__all__ = ["AlreadyExistsError", "DekRecord", "KekRecord", "KekVersion", "KeyStore", "StoreError"]
