"""The real ``kmipd serve`` process: readiness, restart, kill -9, SIGTERM, bad config."""

from __future__ import annotations

import json
import shlex
import signal
import threading
from pathlib import Path

import pytest

from kmipd.client import Client, ShuttingDownError, UnavailableError
from tests.processes import Daemon, run_kmipd

pytestmark = pytest.mark.slow


def dev_client(data: Path, address: str, name: str = "storage") -> Client:
    pki = data / "pki"
    return Client(address, ca=pki / "ca.pem", cert=pki / f"{name}.pem", key=pki / f"{name}-key.pem")


def start_dev(data: Path, log: Path) -> Daemon:
    return Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=log)


def test_dev_server_restarts_with_its_data(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    daemon = start_dev(data, tmp_path / "1.log")
    with dev_client(data, daemon.address) as kms:
        dek = kms.create_dek("orders")
    assert daemon.stop() == 0
    assert (data / "pki" / "admin.pem").exists()
    assert (data / "pki" / "storage-key.pem").stat().st_mode & 0o777 == 0o600
    assert (data / "master.key").stat().st_mode & 0o777 == 0o600

    again = start_dev(data, tmp_path / "2.log")  # reuses the CA, keys and store
    with dev_client(data, again.address) as kms:
        assert kms.get_dek(dek.dek_id).key_bytes() == dek.key_bytes()
    assert again.stop() == 0


def test_the_printed_client_command_works_as_printed(tmp_path: Path) -> None:
    daemon = start_dev(tmp_path / "dev", tmp_path / "d.log")
    try:
        [printed] = [line.strip() for line in daemon.output if "kmipd dek create" in line]
        argv = shlex.split(printed)
        assert argv[0] == "kmipd"
        created = run_kmipd(*argv[1:])
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["namespace"] == "demo"
        assert len(bytes.fromhex(json.loads(created.stdout)["key"])) == 32
    finally:
        assert daemon.stop() == 0


def test_acknowledged_deks_survive_kill_9(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    daemon = start_dev(data, tmp_path / "1.log")
    with dev_client(data, daemon.address) as kms:
        acknowledged = {
            dek.dek_id: dek.key_bytes() for dek in (kms.create_dek("orders") for _ in range(30))
        }
    daemon.kill()  # SIGKILL right after the last acknowledgement: no chance to flush anything
    again = start_dev(data, tmp_path / "2.log")
    with dev_client(data, again.address) as kms:
        fetched = kms.get_deks(list(acknowledged))
    assert {d.dek_id: d.key_bytes() for d in fetched} == acknowledged
    assert again.stop() == 0


def test_sigterm_drains_a_pipelined_burst_and_exits_zero(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    daemon = start_dev(data, tmp_path / "1.log")
    acknowledged: dict[str, bytes] = {}
    refused: list[Exception] = []
    first_ack = threading.Event()

    def burst() -> None:
        with dev_client(data, daemon.address) as kms:
            for _ in range(400):
                try:
                    dek = kms.create_dek("orders")
                except (ShuttingDownError, UnavailableError) as exc:
                    refused.append(exc)
                    return
                acknowledged[dek.dek_id] = dek.key_bytes()
                first_ack.set()

    worker = threading.Thread(target=burst)
    worker.start()
    assert first_ack.wait(30)
    daemon.signal(signal.SIGTERM)
    worker.join(60)
    assert daemon.stop() == 0
    assert "draining" in daemon.stderr()
    again = start_dev(data, tmp_path / "2.log")
    with dev_client(data, again.address) as kms:
        fetched = kms.get_deks(list(acknowledged))
    assert {
        d.dek_id: d.key_bytes() for d in fetched
    } == acknowledged  # nothing acknowledged was lost
    assert again.stop() == 0


def test_second_daemon_on_the_same_store_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    daemon = start_dev(data, tmp_path / "1.log")
    second = run_kmipd("serve", "--config", data / "kmipd.toml")
    assert second.returncode == 1
    assert "in use by another kmipd process" in second.stderr
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            "[server]\nmax_in_flight = 'many'\n",
            "server.max_in_flight: expected an integer, got text",
        ),
        (
            "[server]\nmax_infligt = 3\n",
            "server.max_infligt: unknown key (did you mean server.max_in_flight?)",
        ),
        ("[server]\nlisten = ['localhost']\n", "the port is missing"),
        ("[tls]\nca = 'x'\n", "tls.cert: required"),
        (
            "[[grant]]\nidentity = 'spiffe://t/a'\nnamespaces = ['*']\noperations = ['fly']\n",
            "grant[0].operations: unknown operation 'fly'",
        ),
        ("not toml = = 1", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key_and_exits_non_zero(
    tmp_path: Path, config: str, expected: str
) -> None:
    path = tmp_path / "kmipd.toml"
    path.write_text(config)
    result = run_kmipd("serve", "--config", path)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_certificate_file_is_named(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    daemon = start_dev(data, tmp_path / "1.log")
    assert daemon.stop() == 0
    (data / "pki" / "server.pem").unlink()
    result = run_kmipd("serve", "--config", data / "kmipd.toml")
    assert result.returncode == 1
    assert "server.pem" in result.stderr
    assert "Traceback" not in result.stderr


def test_client_errors_are_one_line_with_exit_status_1(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    daemon = start_dev(data, tmp_path / "1.log")
    try:
        pki = data / "pki"
        common = ["--server", daemon.address, "--ca", pki / "ca.pem"]
        missing = run_kmipd(
            "dek",
            "get",
            "dek_nothere",
            *common,
            "--cert",
            pki / "storage.pem",
            "--key",
            pki / "storage-key.pem",
        )
        assert missing.returncode == 1
        assert missing.stderr.startswith("kmipd: error: not-found")
        denied = run_kmipd(
            "kek",
            "create",
            "x",
            *common,
            "--cert",
            pki / "storage.pem",
            "--key",
            pki / "storage-key.pem",
        )
        assert denied.returncode == 1
        assert "not-authorized" in denied.stderr
        no_creds = run_kmipd("dek", "get", "x", "--server", daemon.address, env={})
        assert no_creds.returncode == 1
        assert "missing --ca, --cert, --key" in no_creds.stderr
    finally:
        assert daemon.stop() == 0


def test_demo_walks_the_flow_and_verifies_every_step() -> None:
    result = run_kmipd("demo", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for step in range(1, 10):
        assert f"\n{step}. " in result.stdout
    assert "refused by the daemon" in result.stdout
    assert "storage opened it with its transport key" in result.stdout
    # A client certificate from the online CA, used for mutual TLS, then renewed.
    assert "issue-certificate: serial " in result.stdout
    assert "a client connected with it" in result.stdout
    assert "renew-certificate (proof: the current certificate" in result.stdout
    # A signing key in the (software) HSM signs a digest; both sides verify it.
    assert "ES256 signature verifies with the exported public key" in result.stdout
    assert "verify-digest on the daemon: valid (version 1)" in result.stdout
    assert "refused (signing-key-only)" in result.stdout
    assert "All steps verified." in result.stdout


def test_demo_sets_and_reads_a_secret() -> None:
    result = run_kmipd("demo", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "set-secret orders/db/replication -> version 1" in result.stdout
    assert "get-secret -> Secret(" in result.stdout
    assert "value=<ProtectedValue 37 bytes" in result.stdout
    assert "7f3c-kmipd-demo" not in result.stdout + result.stderr
    assert "storage, granted keys but not secrets, is refused" in result.stdout
