"""Assembling the daemon from a Config: store, HSM, TLS, service, server, signals.

Under systemd (``kmipd.daemon._systemd``) it also reports its progress and
readiness over sd_notify, serves on socket-activated listeners when it is
given some, and pings the watchdog; ``kmipd.daemon._supervision`` handles
signals, reloads and the watchdog.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

import attrs
import trio

from kmipd.audit import AuditLog
from kmipd.crypto._issuing import renewal_due
from kmipd.daemon._checks import check_serving_config
from kmipd.daemon._keyring import StoreKeyring
from kmipd.daemon._prometheus import MetricsExporter, serve_metrics
from kmipd.daemon._supervision import Supervisor
from kmipd.daemon._systemd import Notifier, ServiceManager
from kmipd.daemon.config import Config, ConfigError
from kmipd.hsm import HsmBackend, HsmError, Pkcs11Hsm, SoftwareHsm, read_pin
from kmipd.metrics._counters import MeasuredHsm, ServerMetrics
from kmipd.net._address import format_address
from kmipd.server import KmipServer, ServerTls, TlsConfigError, open_listeners
from kmipd.service import KeyService, OnlineCa, OnlineCaError, ServerInfo, open_online_ca
from kmipd.store import KeyStore, Store, StoreError, StoreUnavailableError, open_postgres_store
from pki import PkiError, load_certificate, write_private_file

if TYPE_CHECKING:
    from kmipd.store._postgres import PostgresStore

log = logging.getLogger("kmipd.daemon")


@attrs.frozen
class RunningDaemon:
    """Handed to ``on_ready``: where the daemon listens, and how to stop it."""

    addresses: list[str]
    server: KmipServer
    supervisor: Supervisor

    def stop(self) -> None:
        self.supervisor.stop("stop requested")


async def run_daemon(
    config: Config,
    on_ready: Callable[[RunningDaemon], None] | None = None,
    *,
    handle_signals: bool = True,
    manager: ServiceManager | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (or ``stop()``), then drain and return.

    ``on_ready`` is called once the store is open, the HSM answers and the
    listeners accept; that is also when systemd hears ``READY=1``. Signals
    can only be handled on the main thread; an embedding program passes
    ``handle_signals=False`` and calls ``stop()``. ``manager`` is what
    systemd passed (``ServiceManager.from_environment()``); none by default.
    """
    manager = manager or ServiceManager()
    notifier = manager.notifier
    notifier.status("checking the TLS material and the policy")
    report = check_serving_config(config)
    if report.problems:
        raise ConfigError(config.source, report.problems)
    for warning in report.warnings:
        log.warning("%s", warning)
    tls = ServerTls.load(config.tls)
    with contextlib.ExitStack() as resources:
        store = await open_store(config, notifier.status)
        resources.callback(store.close)
        notifier.status("opening the HSM backend")
        hsm = await open_hsm(config, store)
        resources.callback(hsm.close)
        audit = AuditLog.open(
            config.audit_path,
            config.audit_key,
            fail_open_reads=config.audit_fail_open_reads,
            batch_window=config.audit_read_batch,
        )
        resources.callback(audit.close)
        metrics = ServerMetrics()
        store.observer = metrics.record_store
        online = _OnlineCaTasks(config, await _open_online_ca(config, hsm, notifier))
        service = KeyService(
            store=store,
            hsm=MeasuredHsm(hsm, metrics),
            policy=config.policy,
            info=ServerInfo(name=config.server_name),
            create_kek_on_demand=config.create_kek_on_demand,
            lifecycle=config.lifecycle,
            audit=audit,
            transport_trust=tls.transport_trust,
            require_sealed=config.require_sealed,
            secret_max_size=config.secret_max_size,
            online_ca=online.online_ca,
            publish_crl=online.publish_crl if online.online_ca is not None else None,
        )
        server = KmipServer(service, tls, config.limits, metrics=metrics, kmip=config.kmip)
        await online.start(server, notifier)
        supervisor = Supervisor(config, server, service.hsm, notifier, metrics)
        supervisor.watch_writers()
        listeners = await _client_listeners(config, manager)
        metrics_listeners = await _metrics_listeners(config, manager)
        addresses = [format_address(*lst.socket.getsockname()[:2]) for lst in listeners]
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[None]) -> None:
                await server.serve(listeners, task_status=task_status)
                nursery.cancel_scope.cancel()  # the signal watcher and the jobs are done too

            if handle_signals:
                nursery.start_soon(supervisor.handle_signals)
            nursery.start_soon(store.watch_writes)
            nursery.start_soon(audit.flush_periodically)
            nursery.start_soon(_maintain, service, config.check_interval, online.maintain)
            nursery.start_soon(
                _run_rewrap_jobs,
                service,
                config.rewrap_batch,
                config.rewrap_pause,
                config.check_interval,
            )
            if metrics_listeners:
                await nursery.start(serve_metrics, metrics_listeners, MetricsExporter(server))
            await nursery.start(serve_then_stop)
            if manager.watchdog_interval is not None:
                nursery.start_soon(supervisor.watchdog, manager.watchdog_interval)
            log.info("listening on %s", ", ".join(addresses))
            supervisor.ready(addresses)
            if on_ready is not None:
                on_ready(RunningDaemon(addresses, server, supervisor))
        notifier.status("stopped")
        log.info("stopped")


async def open_store(config: Config, status: Callable[[str], None] | None = None) -> Store:
    """The configured store, open (migrated if needed); raises StoreError saying what is
    wrong, ConfigError for an unreadable password file."""
    settings = config.postgres
    if settings is None:
        path = config.sqlite_path()
        if status is not None:
            status(f"opening the key store {path}")
        return KeyStore.open(path, cache_size=config.store_cache_size, shared=config.store_shared)
    conninfo = settings.connection_string()
    if status is not None:
        status("connecting to the PostgreSQL store")
    # Connecting and migrating block: a worker thread keeps the event loop free meanwhile.
    return await trio.to_thread.run_sync(
        lambda: open_postgres_store(
            conninfo,
            cache_size=config.store_cache_size,
            pool_size=settings.pool_size,
            connect_timeout=settings.connect_timeout,
        )
    )


async def _open_online_ca(config: Config, hsm: HsmBackend, notifier: Notifier) -> OnlineCa | None:
    """Once the HSM backend answers: the online CA, if configured, its key in the HSM."""
    notifier.status("waiting for the HSM backend to answer")
    await hsm.check()
    if config.online_ca_key is None or config.tls.online_ca is None:
        return None
    try:
        certificate = load_certificate(config.tls.online_ca, "online CA certificate")
        root = load_certificate(config.tls.ca, "CA certificate")
        return await open_online_ca(hsm, certificate, root, config.online_ca_key)
    except (PkiError, OnlineCaError, HsmError) as exc:
        raise ConfigError(config.source, [f"online_ca: {exc}"]) from None


@attrs.define
class _OnlineCaTasks:
    """What the daemon does for its online CA, beside the service's operations.

    It writes each CRL the CA signs where the TLS layer reads it and loads it at
    once (a revoked certificate is refused from the next handshake on, and open
    connections presenting it are cut); and it renews the daemon's own server
    certificate from the online CA once it is past ``online_ca.renew_at`` of its
    lifetime: new key and certificate written over tls.key and tls.cert
    (atomically, the key first), then loaded for new handshakes while open
    connections carry on.
    """

    config: Config
    online_ca: OnlineCa | None
    server: KmipServer | None = None

    async def start(self, server: KmipServer, notifier: Notifier) -> None:
        self.server = server
        if self.online_ca is not None:
            notifier.status("signing the online CA's CRL")
            await server.service.refresh_crl()  # fresh at every start
            await self.maintain()

    async def publish_crl(self, pem: bytes) -> None:
        path = self.config.tls.online_ca_crl
        assert path is not None
        await trio.to_thread.run_sync(lambda: write_private_file(path, pem, mode=0o644))
        self._reload("the online CA's new CRL")

    async def maintain(self) -> None:
        """Renew the server certificate if it is due (each maintenance pass)."""
        if self.online_ca is None or self.server is None or not self.config.online_ca_renew_server:
            return
        settings = self.server.tls.settings
        current = load_certificate(settings.cert, "server certificate")
        if not renewal_due(current, self.config.online_ca_renew_at, time.time()):
            return
        key_pem, chain_pem = await self.server.service.renew_server_certificate(current)

        def write() -> None:
            # The key first: until the certificate follows, the old pair stays loaded.
            write_private_file(settings.key, key_pem)
            write_private_file(settings.cert, chain_pem, mode=0o644)

        await trio.to_thread.run_sync(write)
        self._reload("the renewed server certificate")
        log.info("renewed the server certificate from the online CA (%s)", settings.cert)

    def _reload(self, what: str) -> None:
        if self.server is None:
            return
        try:
            self.server.tls = ServerTls.load(self.server.tls.settings)
        except TlsConfigError as exc:
            log.error("%s was not loaded: %s", what, exc)


async def open_hsm(config: Config, store: Store | None = None) -> HsmBackend:
    """The configured HSM backend, open; raises HsmError saying what is wrong.

    PKCS#11: loads the library, logs in to the token (a refused PIN stops here,
    and is never retried) and starts the session workers. The software backend
    with its keyring in the PostgreSQL store uses ``store``, or opens the store
    itself (and closes it with the backend).
    """
    if config.pkcs11 is not None:
        return await Pkcs11Hsm.open(config.pkcs11, read_pin(config.pkcs11))
    if config.keyring_in_store:
        assert config.master_key is not None
        owned = store is None
        if store is None:
            try:
                store = await open_store(config)
            except StoreError as exc:
                raise HsmError(f"hsm: the keyring is in the store: {exc}") from None
        if store.backend != "postgresql":
            raise HsmError("hsm.keyring: required unless store.backend = 'postgresql'")
        table = StoreKeyring(cast("PostgresStore", store), owned=owned)
        return await SoftwareHsm.open_shared(config.master_key, table)
    master_key, keyring = config.software_files()
    return SoftwareHsm.open(master_key, keyring)


async def _open_listeners(
    addresses: list[str], key: str, config: Config
) -> list[trio.SocketListener]:
    try:
        return await open_listeners(addresses)
    except OSError as exc:
        raise ConfigError(
            config.source,
            [f"{key}: cannot listen on {', '.join(addresses)}: {exc.strerror or exc}"],
        ) from None


async def _metrics_listeners(config: Config, manager: ServiceManager) -> list[trio.SocketListener]:
    if manager.metrics_socket is not None:  # a worker: its supervisor scrapes it there
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(manager.metrics_socket)  # left by a worker before this one, killed
        await sock.bind(str(manager.metrics_socket))
        sock.listen()
        return [trio.SocketListener(sock)]
    if not config.metrics_listen:
        return []
    listeners = await _open_listeners([config.metrics_listen], "metrics.listen", config)
    log.info(
        "Prometheus metrics on http://%s/metrics",
        format_address(*listeners[0].socket.getsockname()[:2]),
    )
    return listeners


async def _client_listeners(config: Config, manager: ServiceManager) -> list[trio.SocketListener]:
    """The sockets systemd passed (socket activation), else those in server.listen."""
    if not manager.sockets:
        return await _open_listeners(list(config.listen), "server.listen", config)
    if not manager.from_supervisor:
        log.info(
            "socket activation: serving on the %d socket(s) systemd passed (%s); "
            "server.listen is not used",
            len(manager.sockets),
            ", ".join(inherited.name for inherited in manager.sockets),
        )
    return [
        trio.SocketListener(trio.socket.from_stdlib_socket(inherited.socket))
        for inherited in manager.sockets
    ]


async def _maintain(
    service: KeyService, interval: float, also: Callable[[], Awaitable[None]]
) -> None:
    """Apply date transitions, rotate KEKs that reached protect-stop, purge destroyed keys
    (and ``also``: the online CA's server-certificate renewal, this daemon's own).

    On a shared store only the daemon whose turn it is (the holder of the store's
    maintenance lock) does the store's part: two rotating one KEK at once would make
    two versions. When it dies the lock goes with it, and another daemon's next pass
    takes over.
    """
    holder = False
    while True:
        try:
            if await service.store.maintenance_turn():
                if service.store.shared and not holder:
                    # Which process took the turn, for operators (and tests) to see.
                    log.info("maintenance: this daemon (pid %d) holds the lock", os.getpid())
                holder = True
                if service.store.shared:
                    await service.store.refresh_if_changed()  # rows the others changed
                await service.maintain()
            await also()
        except StoreUnavailableError:
            pass  # the store's fault is logged (once) by its WriteHealth; the next pass retries
        except Exception:
            log.exception("maintenance pass failed; retrying in %g s", interval)
        await trio.sleep(interval)  # a periodic pass, not a wait for an event


async def _run_rewrap_jobs(service: KeyService, batch: int, pause: float, interval: float) -> None:
    """Advance running rewrap jobs batch by batch; jobs survive restarts in the store.

    On a shared store the maintenance holder runs them (see _maintain): it looks again
    every ``interval``, so a job started through another daemon starts within it.
    """
    while True:
        # A fresh event before looking: a job started meanwhile wakes us.
        waiting = service.jobs_waiting = trio.Event()
        try:
            mine = await service.store.maintenance_turn()
            jobs = await service.store.list_jobs("running") if mine else []
        except StoreUnavailableError:
            jobs = []  # logged once by the store's WriteHealth; looked at again below
        if not jobs:
            if service.store.shared:
                with trio.move_on_after(interval):  # another daemon's job, or our turn
                    await waiting.wait()
            else:
                await waiting.wait()
            continue
        for job in jobs:
            try:
                await service.run_rewrap_batch(job, batch)
            except StoreUnavailableError:
                await trio.sleep(1)  # logged once by the store's WriteHealth; back off
            except Exception:
                log.exception("rewrap job %s: batch failed; retrying in 1 s", job.job_id)
                await trio.sleep(1)  # back off from a failing store or HSM
            if pause:
                await trio.sleep(pause)  # spare the HSM: operators set the pace
            else:
                await trio.lowlevel.checkpoint()
