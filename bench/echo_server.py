"""The ceiling of this design: a bare trio mutual-TLS server that echoes frames.

It answers each length-prefixed frame with a frame of ``--reply-size`` bytes,
so a client exchanging get-dek-sized messages measures what trio + TLS +
framing cost alone, with no CBOR, no policy, no store and no HSM.

    python bench/echo_server.py --pki DIR --reply-size 120
prints ``listening on HOST:PORT`` when ready.
"""

from __future__ import annotations

import argparse
import ssl
import struct
from pathlib import Path

import trio

_HEADER = struct.Struct(">I")


def server_context(pki: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(pki / "server.pem", pki / "server-key.pem")
    context.load_verify_locations(pki / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    context.num_tickets = 0
    return context


async def serve(pki: Path, reply_size: int) -> None:
    context = server_context(pki)
    reply = _HEADER.pack(reply_size) + b"r" * reply_size

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        buffer = bytearray()
        try:
            while data := await tls.receive_some(65536):
                buffer += data
                answers = 0
                while len(buffer) >= 4:
                    (length,) = _HEADER.unpack_from(buffer)
                    if len(buffer) < 4 + length:
                        break
                    del buffer[: 4 + length]
                    answers += 1
                if answers:
                    await tls.send_all(reply * answers)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await trio.serve_listeners(handle, listeners)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--reply-size", type=int, required=True)
    args = parser.parse_args()
    trio.run(serve, args.pki, args.reply_size)


if __name__ == "__main__":
    main()
