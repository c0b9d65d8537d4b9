"""Assembling the daemon from a Config: store, HSM, TLS, service, server, signals."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable

import attrs
import trio

from kmipd._address import format_address
from kmipd.audit import AuditLog
from kmipd.config import Config
from kmipd.hsm import SoftwareHsm
from kmipd.server import KmipServer, ServerTls, open_listeners
from kmipd.service import KeyService, ServerInfo
from kmipd.store import KeyStore

log = logging.getLogger("kmipd.daemon")


@attrs.frozen
class RunningDaemon:
    """Handed to ``on_ready``: where the daemon listens, and how to stop it."""

    addresses: list[str]
    server: KmipServer

    def stop(self) -> None:
        self.server.request_shutdown()


async def run_daemon(
    config: Config,
    on_ready: Callable[[RunningDaemon], None] | None = None,
    *,
    handle_signals: bool = True,
) -> None:
    """Serve until SIGTERM or SIGINT (or ``stop()``), then drain and return.

    ``on_ready`` is called once the store is open, the HSM answers and the
    listeners accept. Signals can only be handled on the main thread; an
    embedding program passes ``handle_signals=False`` and calls ``stop()``.
    """
    tls = ServerTls.load(config.tls)
    with contextlib.ExitStack() as resources:
        store = KeyStore.open(
            config.store_path, cache_size=config.store_cache_size, shared=config.store_shared
        )
        resources.callback(store.close)
        hsm = SoftwareHsm.open(config.master_key, config.keyring)
        resources.callback(hsm.close)
        audit = AuditLog.open(
            config.audit_path, config.audit_key, fail_open_reads=config.audit_fail_open_reads
        )
        resources.callback(audit.close)
        await hsm.check()
        service = KeyService(
            store=store,
            hsm=hsm,
            policy=config.policy,
            info=ServerInfo(name=config.server_name),
            create_kek_on_demand=config.create_kek_on_demand,
            lifecycle=config.lifecycle,
            audit=audit,
        )
        server = KmipServer(service, tls, config.limits)
        listeners = await open_listeners(list(config.listen))
        addresses = [format_address(*lst.socket.getsockname()[:2]) for lst in listeners]
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[None]) -> None:
                await server.serve(listeners, task_status=task_status)
                nursery.cancel_scope.cancel()  # the signal watcher and the jobs are done too

            if handle_signals:
                nursery.start_soon(_stop_on_signal, server)
            nursery.start_soon(_maintain, service, config.check_interval)
            nursery.start_soon(_run_rewrap_jobs, service, config.rewrap_batch, config.rewrap_pause)
            await nursery.start(serve_then_stop)
            log.info("listening on %s", ", ".join(addresses))
            if on_ready is not None:
                on_ready(RunningDaemon(addresses, server))
        log.info("stopped")


async def _maintain(service: KeyService, interval: float) -> None:
    """Apply date transitions, rotate KEKs that reached protect-stop, purge destroyed keys."""
    while True:
        try:
            await service.maintain()
        except Exception:
            log.exception("maintenance pass failed; retrying in %g s", interval)
        await trio.sleep(interval)  # a periodic pass, not a wait for an event


async def _run_rewrap_jobs(service: KeyService, batch: int, pause: float) -> None:
    """Advance running rewrap jobs batch by batch; jobs survive restarts in the store."""
    while True:
        # A fresh event before looking: a job started meanwhile wakes us.
        waiting = service.jobs_waiting = trio.Event()
        jobs = await service.store.list_jobs("running")
        if not jobs:
            await waiting.wait()
            continue
        for job in jobs:
            try:
                await service.run_rewrap_batch(job, batch)
            except Exception:
                log.exception("rewrap job %s: batch failed; retrying in 1 s", job.job_id)
                await trio.sleep(1)  # back off from a failing store or HSM
            if pause:
                await trio.sleep(pause)  # spare the HSM: operators set the pace
            else:
                await trio.lowlevel.checkpoint()


async def _stop_on_signal(server: KmipServer) -> None:
    # Keeps the handlers installed until the daemon is done, so a second
    # SIGTERM during the drain does not kill it with the default action.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        draining = False
        async for signum in signals:
            name = signal.Signals(signum).name
            if draining:
                log.info("%s: already draining", name)
                continue
            log.info("%s: draining and stopping", name)
            draining = True
            server.request_shutdown()
