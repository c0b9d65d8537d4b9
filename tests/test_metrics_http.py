"""The metrics endpoint over real HTTP: a scrape, and everything else answered, never served.

The daemon runs as a subprocess with ``[metrics] listen``; the scrapes are
urllib's and http.client's, the malformed requests raw bytes on a socket.
"""

from __future__ import annotations

import http.client
import re
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kmipd.daemon._prometheus import MAX_REQUEST_HEAD, MAX_SCRAPERS
from tests import processes
from tests.processes import Daemon


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    tmp = tmp_path_factory.mktemp("metrics")
    data = tmp / "dev"
    first = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp / "0.log")
    assert first.stop() == 0
    config = data / "kmipd-metrics.toml"
    config.write_text(
        re.sub(
            r"listen = \[.*\]\n", 'listen = ["127.0.0.1:0"]\n', (data / "kmipd.toml").read_text()
        )
        + '\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    daemon = Daemon("--config", config, log=tmp / "1.log")
    # Module-scoped: the per-test reaper must not stop it between tests.
    processes.STARTED.remove(daemon)
    try:
        [url] = re.findall(r"Prometheus metrics on http://(\S+?)/metrics", daemon.stderr())
        host, _, port = url.rpartition(":")
        yield host, int(port)
    finally:
        assert daemon.stop() == 0, daemon.stderr()


def raw(endpoint: tuple[str, int], request: bytes) -> bytes:
    """Send bytes as they are, half-close, read the whole answer."""
    with socket.create_connection(endpoint, timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_scrape_is_the_prometheus_text_format(endpoint: tuple[str, int]) -> None:
    host, port = endpoint
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=")
        assert answer.headers["Cache-Control"] == "no-store"
        body = answer.read()
    assert int(answer.headers["Content-Length"]) == len(body)
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"kmipd_requests", "kmipd_connections", "kmipd_keys", "kmipd_build_info"} <= names


def test_head_gets_the_length_without_the_body(endpoint: tuple[str, int]) -> None:
    connection = http.client.HTTPConnection(*endpoint, timeout=10)
    connection.request("HEAD", "/metrics")
    answer = connection.getresponse()
    assert answer.status == 200
    assert int(answer.headers["Content-Length"]) > 0
    assert answer.read() == b""
    connection.close()


@pytest.mark.parametrize(
    ("method", "target", "status", "allow"),
    [
        ("POST", "/metrics", 405, "GET, HEAD"),
        ("GET", "/", 404, None),
        ("GET", "/metrics/../etc", 404, None),
    ],
)
def test_other_requests_are_answered_not_served(
    endpoint: tuple[str, int], method: str, target: str, status: int, allow: str | None
) -> None:
    connection = http.client.HTTPConnection(*endpoint, timeout=10)
    connection.request(method, target)
    answer = connection.getresponse()
    body = answer.read()
    connection.close()
    assert answer.status == status
    assert answer.headers["Allow"] == allow
    assert b"kmipd_" not in body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /metrics\r\n\r\n",  # no version
        b"GET /metrics HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32),  # a TLS ClientHello
    ],
)
def test_a_malformed_request_is_answered_400_and_nothing_else(
    endpoint: tuple[str, int], request_bytes: bytes
) -> None:
    answer = raw(endpoint, request_bytes)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert b"kmipd_" not in answer


def test_a_request_head_over_the_bound_is_refused_431(endpoint: tuple[str, int]) -> None:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (2 * MAX_REQUEST_HEAD)
    answer = raw(endpoint, request + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    assert b"kmipd_" not in answer
    # And the endpoint still serves the next scraper.
    assert raw(endpoint, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 ")


def test_scrapers_beyond_the_bound_are_closed_and_the_endpoint_recovers(
    endpoint: tuple[str, int],
) -> None:
    idle = [socket.create_connection(endpoint, timeout=10) for _ in range(MAX_SCRAPERS)]
    try:
        # Every slot is held by a connection that sends nothing: the next one is closed
        # unanswered instead of queueing behind them.
        assert scrape_or_closed(endpoint) is None
    finally:
        for sock in idle:
            sock.close()
    # The slots come back as the idle scrapers' closes are seen; no restart needed.
    deadline = time.monotonic() + 10
    while (answer := scrape_or_closed(endpoint)) is None:
        assert time.monotonic() < deadline, "the endpoint did not recover"
    assert answer.startswith(b"HTTP/1.1 200 ")


def scrape_or_closed(endpoint: tuple[str, int]) -> bytes | None:
    """A scrape's answer, or None when the endpoint closed the connection unanswered."""
    try:
        answer = raw(endpoint, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    except ConnectionResetError:  # closed with our request unread
        return None
    return answer or None


def test_sqlite_store_latency_is_measured_and_no_pool_is_claimed(
    endpoint: tuple[str, int],
) -> None:
    host, port = endpoint
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
        families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
    assert "kmipd_store_transaction_duration_seconds" in families
    assert not [name for name in families if name.startswith("kmipd_store_pool")]
