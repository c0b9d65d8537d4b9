"""Assembling the daemon from a Config: store, HSM, TLS, service, server, signals.

Under systemd (``kmipd.daemon._systemd``) it also reports its progress and
readiness over sd_notify, serves on socket-activated listeners when it is
given some, and pings the watchdog; ``kmipd.daemon._supervision`` handles
signals, reloads and the watchdog.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import attrs
import trio

from kmipd.audit import AuditLog
from kmipd.daemon._checks import check_serving_config
from kmipd.daemon._prometheus import MetricsExporter, serve_metrics
from kmipd.daemon._supervision import Supervisor
from kmipd.daemon._systemd import ServiceManager
from kmipd.daemon.config import Config, ConfigError
from kmipd.hsm import HsmBackend, Pkcs11Hsm, SoftwareHsm, read_pin
from kmipd.metrics._counters import MeasuredHsm, ServerMetrics
from kmipd.net._address import format_address
from kmipd.server import KmipServer, ServerTls, open_listeners
from kmipd.service import KeyService, ServerInfo
from kmipd.store import KeyStore, Store, StoreUnavailableError, open_postgres_store

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
        hsm = await open_hsm(config)
        resources.callback(hsm.close)
        audit = AuditLog.open(
            config.audit_path,
            config.audit_key,
            fail_open_reads=config.audit_fail_open_reads,
            batch_window=config.audit_read_batch,
        )
        resources.callback(audit.close)
        notifier.status("waiting for the HSM backend to answer")
        await hsm.check()
        metrics = ServerMetrics()
        store.observer = metrics.record_store
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
        )
        server = KmipServer(service, tls, config.limits, metrics=metrics, kmip=config.kmip)
        supervisor = Supervisor(config, server, service.hsm, notifier, metrics)
        supervisor.watch_writers()
        listeners = await _client_listeners(config, manager)
        metrics_listeners = (
            await _open_listeners([config.metrics_listen], "metrics.listen", config)
            if config.metrics_listen
            else []
        )
        addresses = [format_address(*lst.socket.getsockname()[:2]) for lst in listeners]
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[None]) -> None:
                await server.serve(listeners, task_status=task_status)
                nursery.cancel_scope.cancel()  # the signal watcher and the jobs are done too

            if handle_signals:
                nursery.start_soon(supervisor.handle_signals)
            nursery.start_soon(store.watch_writes)
            nursery.start_soon(audit.flush_periodically)
            nursery.start_soon(_maintain, service, config.check_interval)
            nursery.start_soon(
                _run_rewrap_jobs,
                service,
                config.rewrap_batch,
                config.rewrap_pause,
                config.check_interval,
            )
            if metrics_listeners:
                await nursery.start(serve_metrics, metrics_listeners, MetricsExporter(server))
                log.info(
                    "Prometheus metrics on http://%s/metrics",
                    format_address(*metrics_listeners[0].socket.getsockname()[:2]),
                )
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


async def open_hsm(config: Config) -> HsmBackend:
    """The configured HSM backend, open; raises HsmError saying what is wrong.

    PKCS#11: loads the library, logs in to the token (a refused PIN stops here,
    and is never retried) and starts the session workers.
    """
    if config.pkcs11 is not None:
        return await Pkcs11Hsm.open(config.pkcs11, read_pin(config.pkcs11))
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


async def _client_listeners(config: Config, manager: ServiceManager) -> list[trio.SocketListener]:
    """The sockets systemd passed (socket activation), else those in server.listen."""
    if not manager.sockets:
        return await _open_listeners(list(config.listen), "server.listen", config)
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


async def _maintain(service: KeyService, interval: float) -> None:
    """Apply date transitions, rotate KEKs that reached protect-stop, purge destroyed keys.

    On a shared store only the daemon whose turn it is (the holder of the store's
    maintenance lock) does: two rotating one KEK at once would make two versions.
    When it dies the lock goes with it, and another daemon's next pass takes over.
    """
    while True:
        try:
            if await service.store.maintenance_turn():
                await service.maintain()
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
