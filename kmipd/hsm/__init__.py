"""HSM backends: where KEKs live. The service sees only the HsmBackend interface."""

from kmipd.hsm._interface import (
    HsmBackend,
    HsmError,
    HsmIntegrityError,
    HsmKeyNotFoundError,
    HsmUnavailableError,
)
from kmipd.hsm._pkcs11 import Pkcs11Hsm, Pkcs11Settings, pin_path, read_pin
from kmipd.hsm._software import (
    KeyringTable,
    SoftwareHsm,
    create_master_key,
    keyring_handles,
    master_key_opens,
    read_keyring_file,
    read_master_key,
    reseal_entry,
)

__all__ = [
    "HsmBackend",
    "HsmError",
    "HsmIntegrityError",
    "HsmKeyNotFoundError",
    "HsmUnavailableError",
    "KeyringTable",
    "Pkcs11Hsm",
    "Pkcs11Settings",
    "SoftwareHsm",
    "create_master_key",
    "keyring_handles",
    "master_key_opens",
    "pin_path",
    "read_keyring_file",
    "read_master_key",
    "read_pin",
    "reseal_entry",
]
