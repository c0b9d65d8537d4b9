"""Running the real ``kmipd`` command as a subprocess, with readiness, never sleeps."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

LISTENING = re.compile(r"kmipd: listening on (\S+?)(,|$)")


def kmipd_command(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "kmipd", *map(str, args)]


def run_kmipd(
    *args: str | os.PathLike[str], timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kmipd_command(*args), capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


#: Every daemon started, so a failed test cannot leave one running (see conftest).
STARTED: list[Daemon] = []


class Daemon:
    """``kmipd serve`` in a subprocess; ``address`` once it has said it listens."""

    def __init__(self, *args: str | os.PathLike[str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            kmipd_command("serve", *args), stdout=subprocess.PIPE, stderr=self._log
        )
        STARTED.append(self)
        self.output: list[str] = []
        self._stopping = False
        self.address = self._wait_for_listening(deadline=time.monotonic() + 60)

    def _wait_for_listening(self, deadline: float) -> str:
        assert self.process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        buffer = b""
        while time.monotonic() < deadline:
            if not selector.select(timeout=deadline - time.monotonic()):
                break
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
            *lines, rest = buffer.split(b"\n")
            buffer = rest
            for line in lines:
                text = line.decode()
                self.output.append(text)
                match = LISTENING.search(text)
                if match:
                    selector.close()
                    return match.group(1)
        selector.close()
        self.process.kill()
        self.process.wait()
        raise RuntimeError(f"kmipd did not start: {self.stderr()}")

    def stderr(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (once: a second one could land after the daemon's handlers are gone)."""
        if not self._stopping and self.process.poll() is None:
            self.signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._close()
        return code

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._close()

    def reap(self) -> None:
        """Kill the daemon if a test left it running."""
        if self.process.poll() is None:
            self.kill()
        elif not self._log.closed:
            self._close()

    def _close(self) -> None:
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
