"""Opening the listeners named in the config."""

from __future__ import annotations

import trio

from kmipd.net._address import parse_address


async def open_listeners(addresses: list[str]) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    for address in addresses:
        host, port = parse_address(address)
        listeners.extend(await trio.open_tcp_listeners(port, host=host))
    return listeners
