"""The operations behind the protocol: authorize -> store -> HSM -> result."""

from kmipd.service._kmip import KmipOperations
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
from kmipd.service._service import (
    NOT_NOW,
    Caller,
    KeyService,
    ServerInfo,
    ServiceError,
    blob_associated_data,
    dek_associated_data,
    new_dek_id,
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
    "KmipOperations",
    "Policy",
    "PolicyError",
    "ServerInfo",
    "ServiceError",
    "blob_associated_data",
    "dek_associated_data",
    "expand_operations",
    "new_dek_id",
]
