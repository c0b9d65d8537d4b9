"""packaging/systemd: the units pass systemd's own checks, and the packaged config runs.

The last test runs the shipped kmipd.toml unchanged but for the metrics
port, the way kmipd.service and kmipd.socket run it: credentials in a
private directory (mode 0400), state and logs in their own directories,
the listening socket passed in, readiness over sd_notify.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kmipd.cli._main import _build_parser
from kmipd.client import CertificateRejectedError, Client, NotAuthorizedError, NotFoundError
from kmipd.daemon.config import DIRECTORY_VARIABLES, MAX_WORKERS, parse_config, usable_cores
from kmipd.hsm import create_master_key
from pki import CertificateAuthority
from tests.systemd_harness import NotifySocket, kmipd_serve, socket_activated

ROOT = Path(__file__).parent.parent
UNITS = ROOT / "packaging" / "systemd"
# The README and the manuals in docs/ (the systemd section is in docs/operators.md).
README = "\n".join(
    p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
)

needs_systemd_tools = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or shutil.which("systemd-socket-activate") is None,
    reason="needs systemd's tools (Debian package systemd; .ci/setup installs it)",
)


def unit_lines(name: str, key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in (UNITS / name).read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


@needs_systemd_tools
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists: point it at this checkout's kmipd.
    installed = "/opt/kmipd/bin/kmipd"
    here = str(Path(sys.executable).parent / "kmipd")
    service = (UNITS / "kmipd.service").read_text()
    assert service.count(installed) == 1
    (tmp_path / "kmipd.service").write_text(service.replace(installed, here))
    shutil.copy(UNITS / "kmipd.socket", tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "kmipd.service", "kmipd.socket"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "kmipd" not in result.stdout + result.stderr  # no warning about our units


@needs_systemd_tools
def test_exposure_score_gate_and_the_readme_states_the_score(tmp_path: Path) -> None:
    score, level = exposure(UNITS / "kmipd.service")
    assert level in ("SAFE", "OK")
    assert f"**{score} {level}**" in README
    assert f"rates this unit {score} ({level})" in (UNITS / "kmipd.service").read_text()

    # The gate gates: the same unit without its hardening fails it.
    bare = "\n".join(
        line
        for line in (UNITS / "kmipd.service").read_text().splitlines()
        if not re.match(r"(Protect|Private|Restrict|SystemCall|Capability|NoNew|IPAddress)", line)
    )
    (tmp_path / "kmipd.service").write_text(bare)
    with pytest.raises(AssertionError, match="exposure"):
        exposure(tmp_path / "kmipd.service")


def exposure(unit: Path) -> tuple[str, str]:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", unit.name],
        cwd=unit.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for kmipd.service: (\d+\.\d) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert result.returncode == 0, f"exposure {match.group(1)} is above the threshold of 2.0"
    return match.group(1), match.group(2)


def test_packaged_config_and_units_agree(tmp_path: Path) -> None:
    environ = {name: str(tmp_path / name.lower()) for name in DIRECTORY_VARIABLES}
    text = (UNITS / "kmipd.toml").read_text()
    config = parse_config(tomllib.loads(text), source="kmipd.toml", base=UNITS, environ=environ)
    credentials = Path(environ["CREDENTIALS_DIRECTORY"])
    state = Path(environ["STATE_DIRECTORY"])
    assert config.tls.key.parent == credentials
    assert config.master_key.parent == credentials
    assert {config.store_path.parent, config.keyring.parent, config.audit_key.parent} == {state}
    assert config.audit_path.parent == Path(environ["LOGS_DIRECTORY"])
    # Every credential the config reads is one the unit loads.
    loaded = {entry.split(":", 1)[0] for entry in unit_lines("kmipd.service", "LoadCredential")}
    assert {config.tls.key.name, config.master_key.name} <= loaded
    assert unit_lines("kmipd.service", "StateDirectory") == ["kmipd"]
    assert unit_lines("kmipd.service", "LogsDirectory") == ["kmipd"]
    # The unit's command line is one kmipd accepts, with the config where the docs say.
    [command] = unit_lines("kmipd.service", "ExecStart")
    argv = command.split()
    args = _build_parser().parse_args(argv[1:])
    assert args.config == Path("/etc/kmipd/kmipd.toml")
    # Without systemd's variables, the defaults are the host's directories.
    host = parse_config(tomllib.loads(text), source="kmipd.toml", base=UNITS, environ={})
    assert host.tls.key == Path("/etc/kmipd/credentials/server-key.pem")
    assert host.store_path == Path("/var/lib/kmipd/kmipd.db")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
@needs_systemd_tools
def test_the_packaged_config_runs_as_the_units_run_it(tmp_path: Path) -> None:
    etc, credentials, state, logs = (tmp_path / d for d in ("etc", "creds", "state", "logs"))
    for directory in (etc, credentials, state, logs):
        directory.mkdir(mode=0o700)
    ca = CertificateAuthority.init(etc / "pki", trust_domain="prod.example")
    ca.issue_client("db-orders")
    ca.issue_client("kms-admin")
    stranger = CertificateAuthority.init(tmp_path / "other-ca", trust_domain="prod.example")
    stranger.issue_client("db-orders")
    # What LoadCredential= makes: private copies, read-only for the service.
    shutil.copy(ca.server_key_path, credentials / "server-key.pem")
    create_master_key(credentials / "master.key")
    for secret in credentials.iterdir():
        secret.chmod(0o400)
    metrics_port = free_port()
    config = (UNITS / "kmipd.toml").read_text()
    config = config.replace('"127.0.0.1:9696"', f'"127.0.0.1:{metrics_port}"')
    (etc / "kmipd.toml").write_text(config)
    env = {
        "CONFIGURATION_DIRECTORY": str(etc),
        "CREDENTIALS_DIRECTORY": str(credentials),
        "STATE_DIRECTORY": str(state),
        "LOGS_DIRECTORY": str(logs),
    }

    checked = subprocess.run(
        [sys.executable, "-m", "kmipd", "check-config", str(etc / "kmipd.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip().endswith(": OK")

    notify = NotifySocket(tmp_path)
    service, port = socket_activated(
        kmipd_serve(etc / "kmipd.toml"),
        log=tmp_path / "kmipd.log",
        env={**env, "NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "2000000"},
    )
    try:
        address = f"127.0.0.1:{port}"

        def client_files(name: str) -> dict[str, Path]:
            return {
                "ca": ca.ca_cert_path,
                "cert": ca.directory / f"{name}.pem",
                "key": ca.directory / f"{name}-key.pem",
            }

        with Client(address, **client_files("kms-admin")) as admin:
            admin.create_kek("orders")
        with Client(address, **client_files("db-orders")) as kms:
            dek = kms.create_dek("orders")
            key = bytes(dek.key)
            assert bytes(kms.get_dek(dek.dek_id).key) == key
            with pytest.raises(NotFoundError):
                kms.get_dek("dek_" + "a" * 26)
            with pytest.raises(NotAuthorizedError):
                kms.create_dek("payroll")
        foreign = {
            "ca": ca.ca_cert_path,
            "cert": stranger.directory / "db-orders.pem",
            "key": stranger.directory / "db-orders-key.pem",
        }
        with (
            pytest.raises(CertificateRejectedError),
            Client(address, **foreign, timeout=5) as intruder,
        ):
            intruder.status()
        notify.wait_for_field("READY")
        notify.wait_for_field("WATCHDOG")

        metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        # workers = "auto": one per usable core (2 here), all up, answering one scrape.
        workers = min(usable_cores(), MAX_WORKERS)
        assert metrics[("kmipd_worker_up", ())] == 1
        raw = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert raw.read().decode().count("kmipd_worker_up{") == workers
        assert metrics[("kmipd_requests_total", (("operation", "create-dek"),))] == 2
        assert (
            metrics[
                (
                    "kmipd_request_errors_total",
                    (("code", "not-found"), ("operation", "get-dek")),
                )
            ]
            == 1
        )
        assert (
            metrics[
                (
                    "kmipd_request_errors_total",
                    (("code", "not-authorized"), ("operation", "create-dek")),
                )
            ]
            == 1
        )
        failures = {
            labels: value
            for (name, labels), value in metrics.items()
            if name == "kmipd_tls_handshake_failures_total"
        }
        assert sum(failures.values()) >= 1, failures
        assert metrics[("kmipd_keys", (("kind", "dek"), ("state", "active")))] == 1
        assert metrics[("kmipd_hsm_up", ())] == 1
        assert metrics[("kmipd_hsm_call_duration_seconds_count", (("call", "wrap"),))] == 1
        assert metrics[("kmipd_connections_accepted_total", ())] >= 2
        buckets = [
            labels
            for (name, labels) in metrics
            if name == "kmipd_request_duration_seconds_bucket"
            and ("operation", "get-dek") in labels
        ]
        assert len(buckets) == 17  # 16 bounds and +Inf
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=10)
        post = urllib.request.Request(f"http://127.0.0.1:{metrics_port}/metrics", data=b"x")
        with pytest.raises(urllib.error.HTTPError, match="405"):
            urllib.request.urlopen(post, timeout=10)

        assert {p.name for p in state.iterdir()} >= {"kmipd.db", "keyring.cbor", "audit.key"}
        # Each worker writes its own chain beside audit.path; together they hold every record.
        trails = sorted(logs.glob("audit-w*.log"))
        assert len(trails) == workers
        assert sum(t.read_text().count('"operation":"create-dek"') for t in trails) == 2
    finally:
        assert service.stop() == 0
        notify.close()
    verified = subprocess.run(
        [sys.executable, "-m", "kmipd", "audit", "verify", "--workers", str(logs / "audit.log")],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env}, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    log = (tmp_path / "kmipd.log").read_text()
    assert "socket activation" in log
    assert key.hex() not in log
    assert '"operation":' not in log  # audit records go to their own file, not the journal


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The daemon's series without their ``worker`` label: counted series summed over the
    workers, the others (gauges of the one store or HSM each worker sees) their maximum."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    merged: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        counted = family.type in ("counter", "histogram", "summary")
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "worker"))
            key = (sample.name, labels)
            if key in merged:
                merged[key] = (
                    (merged[key] + sample.value) if counted else max(merged[key], sample.value)
                )
            else:
                merged[key] = sample.value
    return merged
