"""KeyService: every operation family, composed over the one ServiceCore.

A new family is one more base here, listed before the families it derives
from (see ``kmipd.service._core`` for how a family module is written).
"""

from __future__ import annotations

from typing import Any

from kmipd.service._certs import CertificateOperations
from kmipd.service._delivery import DeliveryOperations
from kmipd.service._keks import KekOperations
from kmipd.service._lifecycle import LifecycleOperations
from kmipd.service._maintenance import MaintenanceOperations
from kmipd.service._managed import ManagedCertificateOperations
from kmipd.service._objects import object_handlers
from kmipd.service._rewrap import RewrapOperations
from kmipd.service._secrets import SecretOperations
from kmipd.service._signing import SigningOperations
from kmipd.service._transport import TransportOperations


class KeyService(
    ManagedCertificateOperations,
    CertificateOperations,
    SigningOperations,
    SecretOperations,
    RewrapOperations,
    DeliveryOperations,
    TransportOperations,
    LifecycleOperations,
    MaintenanceOperations,
    KekOperations,
):
    """The operations the daemon serves: ``handle`` / ``handle_now`` one request.

    Construction, dispatch, authorization, audit and the commit point come from
    ServiceCore; each base adds one family's handlers.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # KMIP's object operations (kmipd.service._objects) run through the same
        # handle(): authorization, audit and the commit point as the native ones.
        handlers, inline = object_handlers(self)
        self._handlers.update(handlers)
        self._inline.update(inline)
        self._changes_state = self._changes_state | {"register", "modify-attributes"}
