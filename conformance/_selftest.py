"""``--self-test``: the suite against a local ``kmipd serve --dev``, started and stopped here.

The daemon runs as a subprocess (``python -m kmipd``, the interpreter the
suite runs on), on a free loopback port, with a fresh data directory; the
suite reads its test CA from that directory, so every case can run,
including the ones that need the CA key or a CRL the server reads.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from conformance._certs import Credentials
from conformance._context import Target

LISTENING = re.compile(r"kmipd: listening on (\S+?)(,|$)")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class SelfTestError(Exception):
    """The local daemon did not start or stop as it should; the message has its log."""


class SelfTestServer:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / "kmipd.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kmipd",
                "serve",
                "--dev",
                "--data",
                str(data_dir),
                "--listen",
                "127.0.0.1:0",
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.stopped_with: int | None = None
        try:
            self.address = self._wait_for_listening()
        except BaseException:
            self.kill()
            raise

    def _wait_for_listening(self) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=deadline - time.monotonic()):
                    break
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    break
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    match = LISTENING.search(line)
                    if match:
                        return match.group(1)
        raise SelfTestError(f"kmipd serve --dev did not start:\n{self.log_tail()}")

    def target(self) -> Target:
        pki = self.data_dir / "pki"
        host, _, port = self.address.rpartition(":")
        return Target(
            host=host.strip("[]"),
            port=int(port),
            ca=pki / "ca.pem",
            client=Credentials(pki / "storage.pem", pki / "storage-key.pem"),
            admin=Credentials(pki / "admin.pem", pki / "admin-key.pem"),
            ca_dir=pki,
        )

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def terminate(self) -> None:
        """SIGTERM once (a second could land after the daemon's handlers are gone)."""
        if self.stopped_with is None and self.running:
            self.process.send_signal(signal.SIGTERM)
            self.stopped_with = signal.SIGTERM

    def stop(self) -> int:
        """Stop with SIGTERM and return the exit status (0 is a clean drain)."""
        self.terminate()
        try:
            code = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SelfTestError(
                f"kmipd did not exit within {STOP_TIMEOUT:g} s of SIGTERM:\n{self.log_tail()}"
            ) from None
        self._close()
        return code

    def kill(self) -> None:
        if self.running:
            self.process.kill()
        self.process.wait()
        self._close()

    def _close(self) -> None:
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
