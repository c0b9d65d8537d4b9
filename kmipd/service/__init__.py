"""The operations behind the protocol: authorize -> store -> HSM -> result.

One module per operation family, each a class over the shared core, composed
into ``KeyService`` (``_service.py``):

- ``_core``: ServiceCore: construction, ``handle`` / ``handle_now``, the handler
  table, authorization, audit, the commit point, shared helpers; how to add a family
- ``_delivery``: create-dek, get-dek, generate-data-key, unwrap, data-key blobs
- ``_keks``: create-kek, list-keks, rotate-kek, the KEK version a new wrap uses
- ``_lifecycle``: activate, revoke, destroy, recover, get-attributes, locate,
  dependents, changes-since
- ``_transport``: the transport-certificate directory and sealed delivery
- ``_rewrap``: rewrap-dek, rewrap-blob, rewrap jobs
- ``_maintenance``: purging, date transitions, automatic rotation
- ``_objects``: keys as KMIP sees them (create/register with attributes, get,
  attributes, locate, encrypt/decrypt), registered into KeyService's table
- ``_kmip``: KMIP operations (TTLV payloads) turned into those requests
- ``_certs``: the online issuing CA: issue-certificate, renew-certificate,
  revoke-certificate, list-certificates, get-ca-certificates, its CRL
- ``_policy``: who may do what where (grants, operation groups, certificate grants)
"""

from kmipd.service._certs import OnlineCa, OnlineCaError, open_online_ca, sign_crl
from kmipd.service._core import (
    NOT_NOW,
    Caller,
    ServerInfo,
    ServiceError,
    blob_associated_data,
    dek_associated_data,
    new_dek_id,
)
from kmipd.service._kmip import KmipOperations
from kmipd.service._policy import (
    ADMIN_OPERATIONS,
    CERTIFICATE_KEY_TYPES,
    DATA_OPERATIONS,
    DEFAULT_MAX_VALIDITY_DAYS,
    GRANTABLE_OPERATIONS,
    OPERATION_GROUPS,
    CertificateGrant,
    Grant,
    Policy,
    PolicyError,
    expand_operations,
)
from kmipd.service._service import KeyService

__all__ = [
    "ADMIN_OPERATIONS",
    "CERTIFICATE_KEY_TYPES",
    "DATA_OPERATIONS",
    "DEFAULT_MAX_VALIDITY_DAYS",
    "GRANTABLE_OPERATIONS",
    "NOT_NOW",
    "OPERATION_GROUPS",
    "Caller",
    "CertificateGrant",
    "Grant",
    "KeyService",
    "KmipOperations",
    "OnlineCa",
    "OnlineCaError",
    "Policy",
    "PolicyError",
    "ServerInfo",
    "ServiceError",
    "blob_associated_data",
    "dek_associated_data",
    "expand_operations",
    "new_dek_id",
    "open_online_ca",
    "sign_crl",
]
