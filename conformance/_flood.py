"""A garbage flooder in a process of its own, for LIVE-005's latency measurement.

Run as ``python -m conformance._flood HOST PORT CA CERT KEY FRAMES``: it
connects, says hello, prints ``ready``, then sends bursts of FRAMES garbage
frames (reading every answer before the next burst) until its standard input
closes, and prints ``{"bursts": N}``. A separate process, so the flood really
runs beside the measuring client (a thread would share the suite's GIL and
flood far less than it should).
"""

from __future__ import annotations

import json
import secrets
import select
import socket
import ssl
import sys

from conformance._wire import HEADER, frame, request_frame


def garbage(count: int) -> bytes:
    """``count`` frames of bytes that are not one CBOR item (0x1c is reserved)."""
    return b"".join(frame(b"\x1c" + secrets.token_bytes(8 + i % 24)) for i in range(count))


def read_frames(sock: ssl.SSLSocket, count: int) -> None:
    buffer, start, seen = bytearray(), 0, 0
    while seen < count:
        data = sock.recv(1 << 20)
        if not data:
            raise SystemExit("the server closed the flooding connection")
        del buffer[:start]
        buffer += data
        start = 0
        while len(buffer) - start >= HEADER.size:
            end = start + HEADER.size + HEADER.unpack_from(buffer, start)[0]
            if len(buffer) < end:
                break
            start, seen = end, seen + 1


def main() -> None:
    host, port, ca, cert, key, frames = sys.argv[1:7]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    with context.wrap_socket(
        socket.create_connection((host, int(port)), timeout=30), server_hostname=host
    ) as sock:
        sock.sendall(request_frame(0, "hello", {"versions": [1]}))
        read_frames(sock, 1)
        print("ready", flush=True)
        burst, bursts = garbage(int(frames)), 0
        while not select.select([sys.stdin], [], [], 0)[0]:
            sock.sendall(burst)
            read_frames(sock, int(frames))
            bursts += 1
    print(json.dumps({"bursts": bursts}), flush=True)


if __name__ == "__main__":
    main()
