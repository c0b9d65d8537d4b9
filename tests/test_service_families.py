"""The service's operation families: every request has one handler, registered once."""

from __future__ import annotations

import pytest

from kmipd.protocol import OPERATIONS, GetDek, Hello, Status, StatusResult
from kmipd.service import KeyService
from kmipd.service._core import ServiceCore, _Call, handles
from kmipd.service._delivery import DeliveryOperations

#: The operations whose audit record was synced before the answer when the service was one class.
STATE_CHANGING = {
    "create-dek",
    "create-kek",
    "rotate-kek",
    "activate",
    "revoke",
    "destroy",
    "recover",
    "rewrap-dek",
    "start-rewrap",
    "register-transport-cert",
}


def test_every_request_of_the_protocol_has_a_handler() -> None:
    handled = set(KeyService._routes.handlers)
    expected = {op.request for op in OPERATIONS.values()} - {Hello}  # the connection answers hello
    assert expected - handled == set()
    assert KeyService._routes.inline == {GetDek: "_get_dek_now"}


def test_state_changing_operations_stay_durable() -> None:
    assert STATE_CHANGING - KeyService._routes.changes_state == set()
    assert "get-dek" not in KeyService._routes.changes_state


def test_a_second_handler_for_one_request_is_refused_where_the_class_is_defined() -> None:
    class Other(ServiceCore):
        @handles(GetDek)
        async def _other_get_dek(self, call: _Call, request: GetDek) -> None:
            """Never runs: the composition below is refused."""

    refused = "Both: GetDek is handled by both _get_dek and _other_get_dek"
    with pytest.raises(TypeError, match=refused):

        class Both(DeliveryOperations, Other):
            pass


def test_an_override_keeps_its_registration() -> None:
    """A family may refine another's handler under the same name: dispatch finds the override."""

    class Quiet(KeyService):
        async def _status(self, call: _Call, request: Status) -> StatusResult:
            """Replaces the core's status handler; still registered for Status."""
            return await super()._status(call, request)

    assert Quiet._routes.handlers[Status] == "_status"
