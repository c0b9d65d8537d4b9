"""``server.workers`` > 1: a supervisor process and N worker processes sharing its listeners.

The supervisor opens the listeners (or takes the ones systemd passed) and starts each
worker as a fresh interpreter (``python -m kmipd serve --config ...``) with the
listening descriptors passed down (``pass_fds``), never by fork: PKCS#11 sessions, the
trio loop and thread pools are each worker's own. From server.listen each worker gets its
own SO_REUSEPORT socket on the port (the kernel spreads connections by hash); systemd's
sockets are shared by all workers.

Each worker opens the store shared (SQLite's maintenance lock, PostgreSQL's advisory
lock: one worker at a time runs maintenance and rewrap jobs, another takes over when it
dies), its own HSM session and its own audit trail (``audit-w0.log``, ``audit-w1.log``,
... beside ``audit.path``). A worker tells the supervisor it is ready by writing one byte
on a pipe; the supervisor says READY=1 when every worker has, forwards SIGTERM (drain)
and SIGHUP (reload) to all of them, pings the watchdog only while all are up, and
restarts a worker that dies, after a backoff that doubles up to ``MAX_BACKOFF``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from kmipd.audit import worker_trail
from kmipd.daemon._prometheus import serve_metrics
from kmipd.daemon._systemd import InheritedSocket, ServiceManager
from kmipd.daemon._worker_metrics import WorkersExporter
from kmipd.daemon.config import Config, ConfigError
from kmipd.net._address import format_address, parse_address
from kmipd.server import open_listeners

log = logging.getLogger("kmipd.workers")

#: Environment of a worker: its index, the listening descriptors, its readiness pipe.
WORKER_ENV = "KMIPD_WORKER"
WORKER_FDS_ENV = "KMIPD_WORKER_FDS"
WORKER_READY_ENV = "KMIPD_WORKER_READY_FD"
WORKER_METRICS_ENV = "KMIPD_WORKER_METRICS"

#: Seconds between restarts of a worker that keeps dying: 0.1, 0.2, ... at most this.
MAX_BACKOFF = 10.0
#: A worker up this long has its backoff reset.
HEALTHY_AFTER = 30.0


@attrs.frozen
class WorkerRole:
    """What a worker process read from its environment (``from_environment``)."""

    index: int
    sockets: list[InheritedSocket]
    ready_fd: int
    #: Where to serve metrics for the supervisor to scrape (metrics.listen set).
    metrics_socket: Path | None = None

    @classmethod
    def from_environment(cls) -> WorkerRole | None:
        index = os.environ.pop(WORKER_ENV, None)
        if index is None:
            return None
        fds = [int(fd) for fd in os.environ.pop(WORKER_FDS_ENV).split(",") if fd]
        ready_fd = int(os.environ.pop(WORKER_READY_ENV))
        sockets = []
        for fd in fds:
            sock = socket.socket(fileno=fd)
            sock.set_inheritable(False)
            sock.setblocking(False)
            sockets.append(InheritedSocket(f"worker-listener-{fd}", sock))
        metrics = os.environ.pop(WORKER_METRICS_ENV, None)
        return cls(int(index), sockets, ready_fd, Path(metrics) if metrics else None)

    def configure(self, config: Config) -> Config:
        """The worker's view: a shared store, its own audit trail."""
        return attrs.evolve(
            config,
            store_shared=True,
            audit_path=worker_trail(config.audit_path, self.index),
        )

    def manager(self) -> ServiceManager:
        # No notify socket, no watchdog: those are the supervisor's.
        return ServiceManager(
            sockets=self.sockets, from_supervisor=True, metrics_socket=self.metrics_socket
        )

    def announce_ready(self) -> None:
        os.write(self.ready_fd, b"R")
        os.close(self.ready_fd)


@attrs.define
class _Worker:
    index: int
    process: trio.Process | None = None
    ready: bool = False
    restarts: int = 0


class WorkerSupervisor:
    """The parent of the workers: it owns the listeners and the systemd protocol."""

    def __init__(
        self,
        config: Config,
        manager: ServiceManager,
        announce: Callable[[list[str]], None],
    ) -> None:
        self.config = config
        self.manager = manager
        self.notifier = manager.notifier
        self.announce = announce
        self.workers = [_Worker(index) for index in range(config.workers)]
        self.stopping = False
        self.announced = False
        self.addresses: list[str] = []
        self._sockets: list[list[socket.socket]] = []
        self._stop_requested = trio.Event()
        self._first_up = trio.Event()  # worker 0 ready, or the daemon stopping
        self._metrics_dir: Path | None = None

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 when every worker drained and exited 0."""
        self._sockets = self._listening_sockets()
        self.addresses = [format_address(*s.getsockname()[:2]) for s in self._sockets[0]]
        codes: dict[int, int] = {}  # worker -> its exit code once stopping
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._handle_signals, sigs)
                    if self.config.metrics_listen:
                        await self._serve_metrics(nursery)
                    if self.manager.watchdog_interval is not None:
                        nursery.start_soon(self._watchdog, self.manager.watchdog_interval)
                    async with trio.open_nursery() as workers:
                        # Worker 0 alone first: it migrates a new store and makes the
                        # missing key files, which concurrent first starts would race on.
                        workers.start_soon(self._keep_running, self.workers[0], codes)
                        await self._first_up.wait()
                        if not self.stopping:
                            for worker in self.workers[1:]:
                                workers.start_soon(self._keep_running, worker, codes)
                    nursery.cancel_scope.cancel()
        finally:
            for sock in {sock for sockets in self._sockets for sock in sockets}:
                sock.close()
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        self.notifier.status("stopped")
        log.info("stopped: all %d workers exited", len(self.workers))
        return 0 if all(code == 0 for code in codes.values()) else 1

    async def _serve_metrics(self, nursery: trio.Nursery) -> None:
        """metrics.listen is the supervisor's: each scrape merges the workers' registries."""
        assert self.config.metrics_listen is not None
        # 0700, the supervisor's: only it (and root) reaches the workers' sockets.
        self._metrics_dir = Path(tempfile.mkdtemp(prefix="kmipd-metrics-"))
        try:
            listeners = await open_listeners([self.config.metrics_listen])
        except OSError as exc:
            raise ConfigError(
                self.config.source,
                [
                    f"metrics.listen: cannot listen on {self.config.metrics_listen}: "
                    f"{exc.strerror or exc}"
                ],
            ) from None
        exporter = WorkersExporter(
            [self._metrics_socket(w.index) for w in self.workers],
            up=lambda index: self.workers[index].ready,
            restarts=lambda index: self.workers[index].restarts,
        )
        await nursery.start(serve_metrics, listeners, exporter)
        log.info(
            "Prometheus metrics on http://%s/metrics (every worker's, labelled worker=N)",
            format_address(*listeners[0].socket.getsockname()[:2]),
        )

    def _metrics_socket(self, index: int) -> Path:
        assert self._metrics_dir is not None
        return self._metrics_dir / f"w{index}.sock"

    def _listening_sockets(self) -> list[list[socket.socket]]:
        """Per worker, the sockets it accepts on.

        From server.listen: one socket per worker and address, all bound with
        SO_REUSEPORT, so the kernel spreads new connections over the workers by their
        addresses' hash (one shared socket would let whichever worker is awake take
        them all). From systemd: its sockets, shared by every worker.
        """
        if self.manager.sockets:
            log.info(
                "socket activation: %d worker(s) serve on the %d socket(s) systemd passed",
                len(self.workers),
                len(self.manager.sockets),
            )
            shared = [inherited.socket for inherited in self.manager.sockets]
            return [shared for _ in self.workers]
        per_worker: list[list[socket.socket]] = [[] for _ in self.workers]
        try:
            for address in self.config.listen:
                host, port = parse_address(address)
                for info in socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                ):
                    bound = port
                    for sockets in per_worker:
                        sock = _reuseport_listener(info, bound)
                        sockets.append(sock)
                        bound = sock.getsockname()[1]  # port 0: the others take the same
        except OSError as exc:
            for sockets in per_worker:
                for sock in sockets:
                    sock.close()
            raise ConfigError(
                self.config.source,
                [
                    f"server.listen: cannot listen on {', '.join(self.config.listen)}: "
                    f"{exc.strerror or exc}"
                ],
            ) from None
        return per_worker

    async def _keep_running(self, worker: _Worker, codes: dict[int, int]) -> None:
        backoff = 0.0
        while True:
            started = trio.current_time()
            code, was_ready = await self._run_once(worker)
            if self.stopping:
                # Not yet ready, it had no handler and nothing to drain: SIGTERM ended it.
                clean = code == 0 or (code == -signal.SIGTERM and not was_ready)
                codes[worker.index] = 0 if clean else code
                return
            if not was_ready and not self.announced:
                # It never started (a config, store or HSM problem, said in its log above):
                # a restart would fail alike, so the daemon stops, as a single process would.
                log.error(
                    "worker %d could not start (%s): stopping", worker.index, _describe_exit(code)
                )
                codes[worker.index] = code or 1
                self._stop("worker failed to start")
                return
            worker.restarts += 1
            up = trio.current_time() - started
            backoff = 0.1 if up >= HEALTHY_AFTER or backoff == 0 else min(backoff * 2, MAX_BACKOFF)
            log.error(
                "worker %d exited (%s) after %.1f s; restarting it in %.1f s (restart %d)",
                worker.index,
                _describe_exit(code),
                up,
                backoff,
                worker.restarts,
            )
            self.notifier.status(self._status())
            with trio.move_on_after(backoff):  # a backoff, cut short by SIGTERM
                await self._stop_requested.wait()
            if self._stop_requested.is_set():
                return

    async def _run_once(self, worker: _Worker) -> tuple[int, bool]:
        """Start the worker, wait for it to exit: (exit code, whether it got ready)."""
        read_fd, write_fd = os.pipe()
        fds = [sock.fileno() for sock in self._sockets[worker.index]]
        env = dict(os.environ)
        env[WORKER_ENV] = str(worker.index)
        env[WORKER_FDS_ENV] = ",".join(map(str, fds))
        env[WORKER_READY_ENV] = str(write_fd)
        if self._metrics_dir is not None:
            env[WORKER_METRICS_ENV] = str(self._metrics_socket(worker.index))
        for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS"):
            env.pop(variable, None)
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "kmipd", "serve", "--config", self.config.source],
                env=env,
                pass_fds=(*fds, write_fd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # the workers' logs go to stderr, shared
            )
        finally:
            os.close(write_fd)
        worker.process = process
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._wait_ready, worker, read_fd)
                code = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            was_ready, worker.ready = worker.ready, False
            worker.process = None
            os.close(read_fd)
        return code, was_ready

    async def _wait_ready(self, worker: _Worker, read_fd: int) -> None:
        stream = trio.lowlevel.FdStream(os.dup(read_fd))
        async with stream:
            if await stream.receive_some(1) != b"R":
                return  # it died before it was ready
        worker.ready = True
        self._first_up.set()
        log.info("worker %d ready", worker.index)
        if all(w.ready for w in self.workers) and not self.stopping:
            if not self.announced:
                self.announced = True
                self.announce(self.addresses)
            self.notifier.ready(self._status())

    def _status(self) -> str:
        up = sum(w.ready for w in self.workers)
        return f"serving on {', '.join(self.addresses)}; {up}/{len(self.workers)} workers ready"

    async def _handle_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if self.stopping:
                    log.info("SIGHUP: ignored, the daemon is stopping")
                    continue
                self.notifier.reloading()
                log.info("SIGHUP: every worker reloads %s", self.config.source)
                self._signal_all(signal.SIGHUP)
                self.notifier.ready(self._status())
            else:
                self._stop(name)

    def _stop(self, why: str) -> None:
        if self.stopping:
            log.info("%s: already draining", why)
            return
        self.stopping = True
        self._stop_requested.set()
        self._first_up.set()
        log.info("%s: draining and stopping %d workers", why, len(self.workers))
        self.notifier.stopping(
            f"stopping: draining {len(self.workers)} workers",
            needs_seconds=self.config.limits.drain_timeout + 5,
        )
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    async def _watchdog(self, interval: float) -> None:
        """Ping every interval/2 while every worker is up and ready."""
        while True:
            if all(w.ready for w in self.workers) or self.stopping:
                self.notifier.watchdog()
            await trio.sleep(interval / 2)  # the watchdog's period, not a wait for an event


def _reuseport_listener(info: tuple[Any, ...], port: int) -> socket.socket:
    family, kind, proto, _, address = info
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address[0], port, *address[2:]))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
