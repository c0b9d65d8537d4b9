"""Throwaway PostgreSQL clusters for the tests: initdb, start, wait, stop by PID.

A cluster lives in its own temporary directory, listens only on a unix
socket there (``listen_addresses = ''``), and runs as the ``postgres`` user
when the tests run as root (initdb refuses root). Readiness is a connect
loop with a deadline, never a sleep. Without PostgreSQL the tests that
need it skip, saying why; under ``CI=true`` that skip is a failure.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

#: Debian's layout: /usr/lib/postgresql/<major>/bin.
_DEBIAN_ROOT = Path("/usr/lib/postgresql")


def find_bindir() -> Path | None:
    override = os.environ.get("KMIPD_TEST_PG_BINDIR")
    if override:
        path = Path(override)
        return path if (path / "initdb").is_file() else None
    candidates = sorted(
        (p for p in _DEBIAN_ROOT.glob("*/bin") if (p / "initdb").is_file()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return candidates[-1] if candidates else None


def require_postgres() -> Path:
    """The binaries' directory, or skip (fail under CI=true) saying what is missing."""
    bindir = find_bindir()
    if bindir is not None:
        try:
            import psycopg  # noqa: F401, PLC0415 - only these tests need it
        except ImportError:
            reason = "psycopg is not installed (pip install 'psycopg[binary]' psycopg-pool)"
        else:
            return bindir
    else:
        where = os.environ.get("KMIPD_TEST_PG_BINDIR") or f"{_DEBIAN_ROOT}/*/bin"
        reason = f"PostgreSQL is not installed: no initdb in {where} (apt-get install postgresql)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    # The port only names the unix socket (.s.PGSQL.<port>); a free TCP one avoids clashes
    # with a cluster some other program runs on this machine.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """One PostgreSQL cluster in a temporary directory."""

    def __init__(self, bindir: Path, root: Path, *, port: int | None = None) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.socket_dir = root / "socket"
        self.log = root / "postgres.log"
        self.port = port or _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            self._as = {"user": "postgres", "group": pwd.getpwnam("postgres").pw_gid}

    @classmethod
    def create(cls, bindir: Path, **settings: str) -> Cluster:
        root = Path(tempfile.mkdtemp(prefix="kmipd-pg-"))
        cluster = cls(bindir, root)
        cluster.socket_dir.mkdir()
        cluster._own(root, cluster.socket_dir)
        cluster._run(
            "initdb", "-D", cluster.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-instructions",
        )  # fmt: skip
        cluster.configure(**settings)
        return cluster

    def _own(self, *paths: Path) -> None:
        if self._as:
            for path in paths:
                os.chown(path, pwd.getpwnam("postgres").pw_uid, self._as["group"])

    def _run(self, program: str, *args: str | os.PathLike[str]) -> None:
        result = subprocess.run(
            [str(self.bindir / program), *map(str, args)],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.root,
            **self._as,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed: {result.stderr.strip()}")

    def configure(self, **settings: str) -> None:
        """Append settings to postgresql.conf (the last one wins)."""
        base = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "port": str(self.port),
            # Throwaway clusters: the tests kill processes, not machines, so the page cache
            # survives; skipping fsync keeps the suite fast on a shared 2-core machine.
            "fsync": "off",
            "max_connections": "200",
        }
        lines = [f"{k} = {v}" for k, v in {**base, **settings}.items()]
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n" + "\n".join(lines) + "\n")

    def start(self, deadline: float = 30) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data)],
                stdout=log,
                stderr=log,
                cwd=self.root,
                **self._as,
            )
        self.wait_ready(time.monotonic() + deadline)

    def wait_ready(self, deadline: float) -> None:
        import psycopg  # noqa: PLC0415

        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
            try:
                with psycopg.connect(self.conninfo("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
            # The socket appears a few ms after the process starts: poll briefly.
            time.sleep(0.02)

    def replica(self, **settings: str) -> Cluster:
        """A streaming replica of this running cluster, on its own socket and port, not
        started: ``pg_basebackup -R -X stream -c fast`` (without ``-c fast`` it waits
        ~30 s for a spread checkpoint)."""
        root = Path(tempfile.mkdtemp(prefix="kmipd-pg-replica-"))
        replica = Cluster(self.bindir, root)
        replica.socket_dir.mkdir()
        replica._own(root, replica.socket_dir)
        replica._run(
            "pg_basebackup", "-D", replica.data, "-R", "-X", "stream", "-c", "fast",
            "-h", self.socket_dir, "-p", str(self.port), "-U", "postgres",
        )  # fmt: skip
        # The copied postgresql.conf is the primary's: the appended lines win.
        replica.configure(**settings)
        return replica

    def promote(self) -> None:
        """Make this standby a primary; returns once it takes writes."""
        self._run("pg_ctl", "promote", "-w", "-t", "30", "-D", self.data)

    def conninfo(self, dbname: str, **extra: str) -> str:
        parts = {"host": str(self.socket_dir), "port": str(self.port), "dbname": dbname}
        parts.update({"user": "postgres"}, **extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def execute(self, sql: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        import psycopg  # noqa: PLC0415

        with psycopg.connect(self.conninfo(dbname), autocommit=True) as conn:
            cursor = conn.execute(sql.encode())
            return cursor.fetchall() if cursor.description else []

    def stop(self, *, fast: bool = True) -> None:
        """Stop by PID: SIGINT is a fast shutdown (SIGQUIT an immediate one)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT if fast else signal.SIGQUIT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL the postmaster; its backends notice and exit by themselves."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(**settings: str) -> Iterator[Cluster]:
    cluster = Cluster.create(require_postgres(), **settings)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
