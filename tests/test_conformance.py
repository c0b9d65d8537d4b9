"""The conformance suite and the daemon keep each other honest.

The whole suite runs against a real ``kmipd serve --dev`` (its self-test, a
subprocess, as an operator would run it); the cases that need a server
configured otherwise (short timeouts, TLS 1.2 on) run against the in-process
server; and faults injected into the real server show the suite notices
when a server breaks the protocol.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from conformance import (
    CASES_MD,
    Credentials,
    Options,
    Result,
    Run,
    Target,
    Verdict,
    all_cases,
    render_cases_markdown,
    run_cases,
    select_cases,
)
from conformance._wire import MalformedCbor, scan_item
from kmipd.protocol import _connection, _messages
from tests.conftest import RunningServer, ServerFactory

#: Cases the self-test cannot run against a default dev server (and why).
EXPECTED_SKIPS = {"FRAME-010"}  # the idle timeout is 300 s; covered in-process below
SUITE_TIMEOUT = 600


def conformance_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "conformance", *args]


def run_conformance(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the suite's CLI in its own process group, so a timeout takes its daemon down too."""
    process = subprocess.Popen(
        conformance_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the suite did not finish within {timeout} s:\n{out[-3000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.slow
def test_self_test_passes_every_case_against_kmipd_serve_dev(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    done = run_conformance("--self-test", "--json", str(report_path), timeout=SUITE_TIMEOUT)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "self-test: kmipd stopped cleanly on SIGTERM" in done.stdout
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    verdicts = {c["id"]: c["verdict"] for c in report["cases"]}
    assert set(verdicts) == {c.id for c in all_cases()}
    failed = {i for i, v in verdicts.items() if v == "fail"}
    assert not failed, failed
    skipped = {i for i, v in verdicts.items() if v == "skip"}
    if not os.environ.get("CI"):  # outside CI, sslyze may be unavailable (no package index)
        skipped -= {i for i in skipped if i.startswith("SSLYZE-")}
    assert skipped <= EXPECTED_SKIPS, {c["id"]: c["detail"] for c in report["cases"]}
    latency = next(c for c in report["cases"] if c["id"] == "LIVE-005")
    assert latency["verdict"] == "info"
    assert latency["measurements"]["p50_ratio"] > 0  # measured and reported, never asserted
    for case_report in report["cases"]:
        print(f"{case_report['verdict']:>4} {case_report['id']} {case_report['detail'][:100]}")


def test_cases_md_is_generated_from_the_code() -> None:
    assert CASES_MD.read_text(encoding="utf-8") == render_cases_markdown(all_cases()), (
        "conformance/CASES.md is stale: run python -m conformance --write-cases"
    )


def test_every_group_has_cases_with_one_sentence_each() -> None:
    cases = all_cases()
    assert len({c.id for c in cases}) == len(cases)
    assert {c.group for c in cases} == {
        "tls",
        "sslyze",
        "framing",
        "codec",
        "protocol",
        "authz",
        "liveness",
        "fuzz",
        "kmip",
    }
    for c in cases:
        assert c.title.endswith(".") and len(c.title) < 300, c.id


@pytest.mark.parametrize(
    ("data", "violations", "non_preferred"),
    [
        (bytes.fromhex("a16269640c"), (), False),  # {"id": 12}
        (bytes.fromhex("1800"), (), True),  # 0 in a 1-byte argument
        (bytes.fromhex("c101"), ("tag 1",), False),
        (bytes.fromhex("9f01ff"), ("indefinite-length item",), False),
        (bytes.fromhex("f93c00"), ("floating-point value",), False),
        (bytes.fromhex("f7"), ("simple value 23",), False),
        (bytes.fromhex("62c328"), ("invalid UTF-8 in a text string",), False),
    ],
)
def test_the_suites_own_cbor_walker_sees_every_profile_breach(
    data: bytes, violations: tuple[str, ...], non_preferred: bool
) -> None:
    scan = scan_item(data)
    assert (scan.end, scan.profile_violations, scan.non_preferred) == (
        len(data),
        violations,
        non_preferred,
    )


@pytest.mark.parametrize("data", ["", "a3626964", "1c", "ff", "7a00010000", "9f01"])
def test_the_suites_cbor_walker_refuses_malformed_items(data: str) -> None:
    with pytest.raises(MalformedCbor):
        scan_item(bytes.fromhex(data))


# -- in-process servers --------------------------------------------------------------------------


def target_for(kmipd: RunningServer) -> Target:
    host, _, port = kmipd.address.rpartition(":")
    directory = kmipd.ca.directory
    return Target(
        host=host,
        port=int(port),
        ca=kmipd.ca.ca_cert_path,
        client=Credentials(directory / "storage.pem", directory / "storage-key.pem"),
        admin=Credentials(directory / "admin.pem", directory / "admin-key.pem"),
        ca_dir=directory,
    )


async def run_against(
    kmipd: RunningServer, tmp_path: Path, only: list[str], **options: object
) -> dict[str, Result]:
    cases = select_cases(all_cases(), only)
    run = Run(target_for(kmipd), Options(**options), scratch=tmp_path)  # type: ignore[arg-type]
    results = await trio.to_thread.run_sync(lambda: run_cases(run, cases))
    return {r.case.id: r for r in results}


@pytest.mark.slow
async def test_timeout_and_tls12_cases_pass_against_a_server_configured_for_them(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    kmipd = await start_server(allow_tls12=True, frame_timeout=1.0, idle_timeout=1.0)
    results = await run_against(
        kmipd,
        tmp_path,
        ["FRAME-009", "FRAME-010", "TLS-010", "TLS-011"],
        frame_timeout=1.0,
        idle_timeout=1.0,
    )
    assert {i: r.verdict for i, r in results.items()} == dict.fromkeys(results, Verdict.PASS), {
        i: r.detail for i, r in results.items()
    }
    assert "TLS 1.2 on, picked ECDHE-ECDSA-" in results["TLS-010"].detail


@pytest.fixture
def misnamed_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: the server names every error "oops" (the real encoder, wrong name)."""
    real = _connection.error_to_wire

    def wrong_name(*args: object) -> dict[str, object]:
        message = real(*args)  # type: ignore[arg-type]
        message["error"]["name"] = "oops"  # type: ignore[index]
        return message

    monkeypatch.setattr(_connection, "error_to_wire", wrong_name)


async def test_the_suite_fails_a_server_whose_error_names_break_the_cddl(
    kmipd: RunningServer, tmp_path: Path, misnamed_errors: None
) -> None:
    results = await run_against(kmipd, tmp_path, ["PROTO-020", "PROTO-021"])
    for result in results.values():
        assert result.verdict is Verdict.FAIL
        assert "is named 'oops'; protocol.cddl names it" in result.detail
        assert any("'name': 'oops'" in line for line in result.evidence)


async def test_the_suite_fails_a_server_that_accepts_unknown_fields(
    kmipd: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        _messages, "_REQUEST_KEYS", _messages._REQUEST_KEYS | {"conformance-extra", "extra"}
    )
    results = await run_against(kmipd, tmp_path, ["CODEC-012", "PROTO-033"])
    assert results["CODEC-012"].verdict is Verdict.FAIL
    assert "expected error bad-request, got id=" in results["CODEC-012"].detail
    assert results["PROTO-033"].verdict is Verdict.FAIL


# -- the command line ---------------------------------------------------------------------------


def test_bad_usage_gets_a_clear_error_and_exit_status_2(tmp_path: Path) -> None:
    unknown = run_conformance("--only", "nosuch", "--list")
    assert unknown.returncode == 2
    assert "--only 'nosuch' matches no case (groups: tls, sslyze, framing" in unknown.stderr
    missing = run_conformance("--server", "127.0.0.1:1")
    assert missing.returncode == 2
    assert "missing --ca, --cert, --key (or use --self-test)" in missing.stderr
    address = run_conformance("--server", "nohost", "--ca", "a", "--cert", "b", "--key", "c")
    assert address.returncode == 2
    assert "expected HOST:PORT" in address.stderr


def test_an_unreachable_server_is_named_with_exit_status_2(tmp_path: Path) -> None:
    with socket.socket() as placeholder:  # a port nobody listens on
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    pem = tmp_path / "x.pem"
    pem.write_text("not a certificate")
    done = run_conformance(
        "--server", f"127.0.0.1:{port}", "--ca", str(pem), "--cert", str(pem), "--key", str(pem)
    )
    assert done.returncode == 2
    assert f"cannot run the suite against 127.0.0.1:{port}" in done.stderr


def test_list_names_every_case_once() -> None:
    done = run_conformance("--list")
    assert done.returncode == 0
    listed = [line.split()[0] for line in done.stdout.splitlines()]
    assert listed == [c.id for c in all_cases()]


@pytest.mark.slow
async def test_session_and_budget_cases_pass_against_kmipd(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    kmipd = await start_server()
    results = await run_against(kmipd, tmp_path, ["LIVE-007", "LIVE-008", "LIVE-009", "LIVE-010"])
    for case_id, result in results.items():
        assert result.verdict is Verdict.PASS, (case_id, result.detail, result.evidence[-5:])
    assert results["LIVE-010"].measurements["refused"] == 18
