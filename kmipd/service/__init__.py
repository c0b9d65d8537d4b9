"""The operations behind the protocol: authorize -> store -> HSM -> result."""

from kmipd.service._core import (
    NOT_NOW,
    Caller,
    KeyService,
    ServerInfo,
    ServiceError,
    blob_associated_data,
    dek_associated_data,
    new_dek_id,
)
from kmipd.service._policy import (
    ADMIN_OPERATIONS,
    DATA_OPERATIONS,
    GRANTABLE_OPERATIONS,
    OPERATION_GROUPS,
    Grant,
    Policy,
    PolicyError,
    expand_operations,
)

__all__ = [
    "ADMIN_OPERATIONS",
    "DATA_OPERATIONS",
    "GRANTABLE_OPERATIONS",
    "NOT_NOW",
    "OPERATION_GROUPS",
    "Caller",
    "Grant",
    "KeyService",
    "Policy",
    "PolicyError",
    "ServerInfo",
    "ServiceError",
    "blob_associated_data",
    "dek_associated_data",
    "expand_operations",
    "new_dek_id",
]
