"""Shared fixtures: a real CA, and a real in-process server on loopback.

Everything is real: TLS with certificates from the project's CA, SQLite
files under tmp_path, the software HSM with its master key file.
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from kmipd.client import AsyncClient, Client, client_context
from kmipd.hsm import HsmBackend, SoftwareHsm
from kmipd.net._trio_tls import TlsChannel
from kmipd.protocol import FrameReader, decode_item, encode_frame, encode_item
from kmipd.server import KmipServer, ServerLimits, ServerTls, TlsSettings
from kmipd.service import DATA_OPERATIONS, GRANTABLE_OPERATIONS, Grant, KeyService, Policy
from kmipd.store import KeyStore, Store, open_postgres_store
from pki import CertificateAuthority
from tests import postgres, processes

TRUST_DOMAIN = "kmipd.test"


@pytest.fixture(autouse=True)
def _reap_daemons() -> Iterator[None]:
    """A failing test must not leave a daemon subprocess behind."""
    yield
    while processes.STARTED:
        processes.STARTED.pop().reap()


# -- PostgreSQL: one throwaway cluster per session, a fresh database per test -------------


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[postgres.Cluster]:
    """Skips (fails under CI=true) without PostgreSQL: see tests/postgres.py."""
    with postgres.running_cluster() as cluster:
        yield cluster


_databases = itertools.count()


@attrs.define
class PostgresDatabases:
    """Databases made on demand in the session's cluster, dropped after the test."""

    cluster: postgres.Cluster
    made: list[str] = attrs.Factory(list)

    def new(self) -> str:
        """A fresh, empty database; returns its libpq connection string."""
        name = f"kmipd_test_{next(_databases)}"
        self.cluster.execute(f"CREATE DATABASE {name}")
        self.made.append(name)
        return self.cluster.conninfo(name)

    def drop_all(self) -> None:
        for name in self.made:
            self.cluster.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def postgres_databases(postgres_cluster: postgres.Cluster) -> Iterator[PostgresDatabases]:
    databases = PostgresDatabases(postgres_cluster)
    yield databases
    databases.drop_all()


@pytest.fixture
def postgres_db(postgres_databases: PostgresDatabases) -> str:
    """The connection string of a fresh database."""
    return postgres_databases.new()


#: Opens the store of one data directory: ``open_store(data, **options)``.
StoreOpener = Callable[..., Store]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(store_backend: str, request: pytest.FixtureRequest) -> StoreOpener:
    """The store tests' backend: SQLite files, or PostgreSQL databases (one per data
    directory, so a reopened directory finds its keys and two directories share none)."""
    if store_backend == "sqlite":
        return lambda data, **options: KeyStore.open(data / "kmipd.db", **options)
    databases: PostgresDatabases = request.getfixturevalue("postgres_databases")
    by_directory: dict[Path, str] = {}

    def open_postgres(data: Path, **options: Any) -> Store:
        if data not in by_directory:
            by_directory[data] = databases.new()
        return open_postgres_store(by_directory[data], **options)

    return open_postgres


CLIENTS = ("admin", "storage", "tenant")


def make_policy() -> Policy:
    return Policy(
        (
            Grant(f"spiffe://{TRUST_DOMAIN}/admin", ("*",), GRANTABLE_OPERATIONS),
            Grant(f"spiffe://{TRUST_DOMAIN}/storage", ("*",), DATA_OPERATIONS),
            Grant(f"spiffe://{TRUST_DOMAIN}/tenant", ("tenant-a", "tenant-a/*"), DATA_OPERATIONS),
        )
    )


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    authority = CertificateAuthority.init(
        tmp_path / "pki", trust_domain=TRUST_DOMAIN, ip_addresses=("127.0.0.1", "::1")
    )
    for name in CLIENTS:
        authority.issue_client(name)
    return authority


def credentials(ca: CertificateAuthority, name: str) -> dict[str, Path]:
    return {
        "ca": ca.ca_cert_path,
        "cert": ca.directory / f"{name}.pem",
        "key": ca.directory / f"{name}-key.pem",
    }


@attrs.define
class RunningServer:
    address: str
    ca: CertificateAuthority
    server: KmipServer
    service: KeyService
    store: KeyStore
    data: Path
    stopped: trio.Event

    def client(self, name: str = "storage", **kwargs: Any) -> Client:
        return Client(self.address, **credentials(self.ca, name), **kwargs)

    def async_client(self, name: str = "storage", **kwargs: Any) -> AsyncClient:
        return AsyncClient(self.address, **credentials(self.ca, name), **kwargs)

    async def raw(self, name: str = "storage", *, hello: bool = True) -> RawConnection:
        """A TLS connection speaking frames by hand, for malformed input."""
        connection = await RawConnection.open(self.address, self.ca, name)
        if hello:
            await connection.send({"id": 0, "op": "hello", "args": {"versions": [1]}})
            assert "result" in await connection.receive()
        return connection


class RawConnection:
    def __init__(self, channel: TlsChannel) -> None:
        self.channel = channel
        self.reader = FrameReader(1 << 20)

    @classmethod
    async def open(
        cls,
        address: str,
        ca: CertificateAuthority,
        name: str,
        context: ssl.SSLContext | None = None,
    ) -> RawConnection:
        host, _, port = address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        context = context or client_context(**credentials(ca, name))
        channel = TlsChannel(stream, context, server_side=False, server_hostname=host)
        try:
            await channel.handshake()
        except BaseException:
            await stream.aclose()
            raise
        return cls(channel)

    async def send(self, message: object) -> None:
        await self.channel.send_all(encode_frame(encode_item(message)))

    async def send_raw(self, data: bytes) -> None:
        await self.channel.send_all(data)

    async def receive(self) -> Any:
        """The next message; raises EOFError when the server closed the connection."""
        with trio.fail_after(10):
            while (frame := self.reader.next_frame()) is None:
                data = await self.channel.receive_some()
                if not data:
                    raise EOFError("server closed the connection")
                self.reader.feed(data)
        return decode_item(frame)

    async def receive_until_closed(self) -> list[Any]:
        messages = []
        try:
            while True:
                messages.append(await self.receive())
        except (EOFError, trio.BrokenResourceError, ssl.SSLError):
            return messages

    async def aclose(self) -> None:
        await self.channel.aclose()


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_server(
    ca: CertificateAuthority, tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[ServerFactory]:
    """Start servers with chosen limits; each is drained and closed after the test."""
    started: list[RunningServer] = []

    async def start(
        *,
        policy: Policy | None = None,
        host: str = "127.0.0.1",
        hsm: HsmBackend | None = None,
        **limits: Any,
    ) -> RunningServer:
        """``hsm``: another backend than a fresh software one (closed with the server)."""
        data = tmp_path / f"server{len(started)}"
        data.mkdir()
        store = KeyStore.open(data / "kmipd.db")
        if hsm is None:
            hsm = SoftwareHsm.open(data / "master.key", data / "keyring.cbor", create=True)
        service = KeyService(
            store=store, hsm=hsm, policy=policy or make_policy(), create_kek_on_demand=True
        )
        settings = TlsSettings(
            ca=ca.ca_cert_path,
            cert=ca.server_cert_path,
            key=ca.server_key_path,
            crl=ca.crl_path,
            trust_domain=TRUST_DOMAIN,
            allow_tls12=limits.pop("allow_tls12", False),
            session_tickets=limits.pop("session_tickets", 0),
            kmip_tls12=limits.get("kmip") is not None and limits["kmip"].enabled,
        )
        crl_check_interval = limits.pop("crl_check_interval", 1.0)
        kmip = limits.pop("kmip", None)  # a KmipSettings: serve KMIP too
        server = KmipServer(
            service,
            ServerTls.load(settings),
            ServerLimits(**limits),
            crl_check_interval=crl_check_interval,
            kmip=kmip,
        )
        listeners = await trio.open_tcp_listeners(0, host=host)
        stopped = trio.Event()

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            try:
                await server.serve(listeners, task_status=task_status)
            finally:
                store.close()
                hsm.close()
                stopped.set()

        await nursery.start(serve)
        port = listeners[0].socket.getsockname()[1]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        running = RunningServer(address, ca, server, service, store, data, stopped)
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.request_shutdown()
        with trio.fail_after(30):
            await running.stopped.wait()


@pytest.fixture
async def kmipd(start_server: ServerFactory) -> RunningServer:
    return await start_server()
