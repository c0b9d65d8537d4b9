"""How the running daemon answers its supervisor: signals, readiness, reloads, watchdog.

* SIGTERM / SIGINT: stop accepting, drain (at most ``server.drain_timeout``),
  exit 0; ``STOPPING=1`` tells systemd, with the time the drain may take.
* SIGHUP (``systemctl reload``): re-read the config file and apply what can
  change under load — TLS material, grants, crypto-periods and lifecycle
  settings, server limits, log level — between ``RELOADING=1`` and
  ``READY=1``. Established connections keep their session; new handshakes
  use the new certificate. A config that does not load or fails the serving
  checks is refused with one log line and the old one stays in force.
* Watchdog: with ``WatchdogSec=``, ``WATCHDOG=1`` every half interval, but
  only after the HSM backend answered a check within a quarter interval. A
  wedged HSM (or a blocked event loop, which runs no check at all) stops the
  pings, and systemd restarts the daemon.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import attrs
import trio

from kmipd.audit import AuditError
from kmipd.daemon._checks import check_serving_config
from kmipd.daemon._logging import set_level
from kmipd.daemon._systemd import Notifier
from kmipd.daemon.config import Config, ConfigError, load_config
from kmipd.hsm import HsmBackend, HsmError, Pkcs11Settings
from kmipd.metrics._counters import ServerMetrics
from kmipd.server import KmipServer, ServerTls, TlsConfigError

log = logging.getLogger("kmipd.daemon")

#: Config fields a reload applies; any other change waits for a restart.
RELOADED_FIELDS = frozenset(
    {
        "source",
        "tls",
        "policy",
        "lifecycle",
        "limits",
        "log_level",
        "require_sealed",
        "secret_max_size",
    }
)

#: Config field -> the key an operator edits, for "needs a restart" messages.
_CONFIG_KEYS = {
    "listen": "server.listen",
    "server_name": "server.name",
    "store_path": "store.path",
    "store_cache_size": "store.cache_size",
    "store_shared": "store.shared",
    "store_backend": "store.backend",
    "postgres": "store.conninfo/password_file/pool_size",
    "hsm_backend": "hsm.backend",
    "master_key": "hsm.master_key",
    "keyring": "hsm.keyring",
    "create_kek_on_demand": "keys.create_kek_on_demand",
    "check_interval": "lifecycle.check_interval",
    "rewrap_batch": "lifecycle.rewrap_batch",
    "rewrap_pause": "lifecycle.rewrap_pause",
    "audit_path": "audit.path",
    "audit_key": "audit.key",
    "audit_fail_open_reads": "audit.fail_open_reads",
    "audit_read_batch": "audit.read_batch_ms",
    "metrics_listen": "metrics.listen",
}


@attrs.frozen
class PreparedReload:
    config: Config
    tls: ServerTls
    warnings: list[str]


def prepare_reload(source: str) -> PreparedReload:
    """Load and check the config file again; raises ConfigError or TlsConfigError.

    Blocking (file reads, certificate checks): run it on a worker thread.
    """
    config = load_config(Path(source))
    report = check_serving_config(config)
    if report.problems:
        raise ConfigError(config.source, report.problems)
    return PreparedReload(config, ServerTls.load(config.tls), report.warnings)


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The config keys that changed but only take effect after a restart."""
    changed = [
        _CONFIG_KEYS.get(field.name, field.name)
        for field in attrs.fields(Config)
        if field.name not in RELOADED_FIELDS
        and field.name != "pkcs11"
        and getattr(old, field.name) != getattr(new, field.name)
    ]
    if old.pkcs11 != new.pkcs11:
        if old.pkcs11 is None or new.pkcs11 is None:
            changed.append("hsm (PKCS#11 settings)")
        else:
            changed.extend(
                f"hsm.{field.name}"
                for field in attrs.fields(Pkcs11Settings)
                if getattr(old.pkcs11, field.name) != getattr(new.pkcs11, field.name)
            )
    return changed


class Supervisor:
    def __init__(
        self,
        config: Config,
        server: KmipServer,
        hsm: HsmBackend,
        notifier: Notifier,
        metrics: ServerMetrics,
    ) -> None:
        self.config = config
        self.server = server
        self.hsm = hsm
        self.notifier = notifier
        self.metrics = metrics
        self.addresses: list[str] = []
        self.stopping = False
        self.hsm_healthy = True

    def serving_status(self) -> str:
        status = f"serving on {', '.join(self.addresses)}"
        if not self.hsm_healthy:
            status = f"{status}; HSM NOT ANSWERING"
        service = self.server.service
        writers = [service.store.health] + ([service.audit.health] if service.audit else [])
        for health in writers:
            if not health.ok:
                status = f"{status}; {health.what.upper()} CANNOT WRITE: {health.cause}"
        return status

    def watch_writers(self) -> None:
        """systemd's status line follows the store's and the audit trail's faults at once.

        The watchdog keeps pinging through them: a restart frees no disk space,
        and the daemon still serves what needs no write.
        """
        service = self.server.service
        writers = [service.store.health] + ([service.audit.health] if service.audit else [])
        for health in writers:
            health.listeners.append(self._writer_changed)

    def _writer_changed(self) -> None:
        if self.addresses and not self.stopping:
            self.notifier.status(self.serving_status())

    def ready(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.notifier.ready(self.serving_status())

    def stop(self, why: str) -> None:
        if self.stopping:
            log.info("%s: already draining", why)
            return
        self.stopping = True
        connections = self.server.connection_count
        log.info("%s: draining and stopping", why, extra={"fields": {"connections": connections}})
        self.notifier.stopping(
            f"stopping: draining {connections} connection(s)",
            # The drain bound, the cut-off grace and a margin for closing files.
            needs_seconds=self.server.limits.drain_timeout + 5,
        )
        self.server.request_shutdown()

    async def handle_signals(self) -> None:
        # Keeps the handlers installed until the daemon is done, so a second
        # SIGTERM during the drain does not kill it with the default action.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    self.stop(name)

    async def reload(self) -> None:
        if self.stopping:
            log.info("SIGHUP: ignored, the daemon is stopping")
            return
        self.notifier.reloading()
        log.info("SIGHUP: reloading %s", self.config.source)
        try:
            prepared = await trio.to_thread.run_sync(prepare_reload, self.config.source)
        except (ConfigError, TlsConfigError) as exc:
            self._refused(f"reload refused, the running configuration stays in force: {exc}")
            return
        except Exception:
            # Whatever went wrong, a reload must never take the serving daemon down.
            log.exception("reload failed unexpectedly")
            self._refused("reload refused, the running configuration stays in force")
            return
        for warning in prepared.warnings:
            log.warning("%s", warning)
        self._apply(prepared)
        await self._reopen_audit()
        self.metrics.reloads["applied"] += 1
        self.notifier.ready(self.serving_status())

    async def _reopen_audit(self) -> None:
        """A rotated audit trail (renamed away before the reload) continues in a new file."""
        audit = self.server.service.audit
        if audit is None:
            return
        try:
            if await audit.reopen():
                log.info("audit trail rotated: the chain continues in a new %s", audit.path)
        except AuditError as exc:
            log.error("%s", exc)

    def _refused(self, message: str) -> None:
        self.metrics.reloads["refused"] += 1
        log.error("%s", message)
        self.notifier.ready(f"{self.serving_status()}; last reload refused (see the log)")

    def _apply(self, prepared: PreparedReload) -> None:
        old, new = self.config, prepared.config
        # Each is read afresh per handshake / per request: swapping the object is atomic
        # for the event loop, and connections already established keep their session.
        self.server.tls = prepared.tls
        self.server.limits = new.limits
        self.server.service.policy = new.policy
        self.server.service.lifecycle = new.lifecycle
        self.server.service.require_sealed = new.require_sealed
        self.server.service.secret_max_size = new.secret_max_size
        set_level(new.log_level)
        self.config = new
        pending = restart_only_changes(old, new)
        log.info(
            "reloaded: certificates, CRL, %d grant(s), crypto-periods and limits in force",
            len(new.policy.grants),
        )
        if pending:
            log.warning("changed, but applied only after a restart: %s", ", ".join(pending))

    async def watchdog(self, interval: float) -> None:
        """Ping every interval/2 while the HSM answers within interval/4."""
        period, timeout = interval / 2, interval / 4
        while True:
            started = trio.current_time()
            problem = await self._check_hsm(within=timeout)
            if problem is None:
                self.notifier.watchdog()
                if not self.hsm_healthy:
                    self.hsm_healthy = True
                    log.info("HSM backend answers again: watchdog pings resumed")
                    self.notifier.status(self.serving_status())
            elif self.hsm_healthy:
                self.hsm_healthy = False
                log.error(
                    "HSM backend %s: withholding watchdog pings so systemd restarts kmipd",
                    problem,
                )
                self.notifier.status(self.serving_status())
            await trio.sleep_until(started + period)

    async def _check_hsm(self, *, within: float) -> str | None:
        with trio.move_on_after(within):
            try:
                await self.hsm.check()
            except HsmError as exc:
                return f"fails its check ({exc})"
            return None
        return f"did not answer its check within {within:g} s"
