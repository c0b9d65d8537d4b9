"""The supervisor's Prometheus endpoint: every worker's series, each with a ``worker`` label.

Each worker serves its own registry on a private unix socket (in a 0700 directory the
supervisor made); a scrape of ``metrics.listen`` fetches all of them, bounded in time,
and merges them family by family, adding ``worker="N"`` to every sample, plus the
supervisor's own ``kmipd_worker_up`` and ``kmipd_worker_restarts_total``. Sum over
``worker`` for the daemon's totals; store-wide gauges (``kmipd_keys``) are the same
store seen by each worker: take ``max``, not ``sum``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

log = logging.getLogger("kmipd.metrics")

#: A worker gets this long to answer the supervisor's scrape; a slow one is left out.
WORKER_SCRAPE_TIMEOUT = 5.0
_NAME_END = re.compile(r"[^a-zA-Z0-9_:]")


def with_worker_label(sample: str, worker: int) -> str:
    """``name{a="b"} 1`` -> ``name{worker="0",a="b"} 1``; ``name 1`` -> ``name{worker="0"} 1``."""
    match = _NAME_END.search(sample)
    end = match.start() if match else len(sample)
    name, rest = sample[:end], sample[end:]
    if rest.startswith("{}"):
        rest = rest[2:]
    if rest.startswith("{"):
        return f'{name}{{worker="{worker}",{rest[1:]}'
    return f'{name}{{worker="{worker}"}}{rest}'


def merge_expositions(texts: Sequence[tuple[int, str]]) -> str:
    """Prometheus text expositions of several workers as one, families in first-seen order."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                header = headers.setdefault(family, [])
                samples.setdefault(family, [])
                if len(header) < 2 and line not in header:
                    header.append(line)
            elif line and not line.startswith("#"):
                samples.setdefault(family, []).append(with_worker_label(line, worker))
    lines = []
    for family, header in headers.items():
        lines.extend(header)
        lines.extend(samples[family])
    return "\n".join(lines) + "\n"


async def scrape_unix(path: Path) -> str:
    """GET /metrics from a worker's unix socket; raises OSError/ValueError on failure."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n")
        answer = bytearray()
        while chunk := await stream.receive_some(65536):
            answer += chunk
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        raise ValueError(f"answered {status!r}")
    return body.decode()


class WorkersExporter:
    """What serve_metrics renders in the supervisor: the workers' registries, merged."""

    def __init__(
        self,
        sockets: Sequence[Path],
        up: Callable[[int], bool],
        restarts: Callable[[int], int],
    ) -> None:
        self.sockets = list(sockets)
        self.up = up
        self.restarts = restarts
        self._texts: list[tuple[int, str]] = []

    async def refresh(self) -> None:
        texts: list[tuple[int, str]] = []

        async def one(index: int, path: Path) -> None:
            if not self.up(index):
                return
            with trio.move_on_after(WORKER_SCRAPE_TIMEOUT):
                try:
                    texts.append((index, await scrape_unix(path)))
                except (OSError, ValueError, UnicodeDecodeError) as exc:
                    log.warning("metrics: worker %d did not answer: %s", index, exc)

        async with trio.open_nursery() as nursery:
            for index, path in enumerate(self.sockets):
                nursery.start_soon(one, index, path)
        self._texts = sorted(texts)

    def render(self) -> bytes:
        answered = {index for index, _ in self._texts}
        own = [
            "# HELP kmipd_worker_up Whether the worker answered this scrape (1) or not (0)",
            "# TYPE kmipd_worker_up gauge",
            *(
                f'kmipd_worker_up{{worker="{index}"}} {int(index in answered)}'
                for index in range(len(self.sockets))
            ),
            "# HELP kmipd_worker_restarts_total Times the supervisor restarted the worker",
            "# TYPE kmipd_worker_restarts_total counter",
            *(
                f'kmipd_worker_restarts_total{{worker="{index}"}} {self.restarts(index)}'
                for index in range(len(self.sockets))
            ),
        ]
        return ("\n".join(own) + "\n" + merge_expositions(self._texts)).encode()
