"""sslyze against the server, with the client's credentials, judged by Mozilla's profiles.

A TLS 1.3-only port (the native protocol only) is judged by "modern"; a port
that accepts TLS 1.2 (KMIP on, whose clients need 1.2, or tls.allow_tls12)
by "intermediate", which allows 1.2 with ECDHE + AEAD suites.

sslyze pins cryptography<47 while kmipd needs 50, so it never shares an
environment with the project: the suite creates a virtual environment for
it on demand (``--sslyze-venv``, default a per-user cache directory, kept
between runs), and runs ``_sslyze_scan.py`` there as a subprocess. One scan
feeds every case in this group; each case owns some of the profile's
criteria and fails on any finding among them.

Where sslyze cannot be installed (no package index), the group is skipped
with the reason, except under CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from conformance._case import CaseFailed, CaseSkipped, case
from conformance._context import Context
from conformance._tlsprobe import ALLOWED_TLS12_SUITES, TLS12, client_hello, offer_hello

SSLYZE_VERSION = "6.3.1"
INSTALL_TIMEOUT = 900
SCAN_TIMEOUT = 600
_SCANNER = Path(__file__).with_name("_sslyze_scan.py")
_READY_MARK = ".kmipd-conformance-ready"

#: Which case owns which of sslyze's "modern" criteria; anything else goes to SSLYZE-006.
CRITERIA = {
    "SSLYZE-002": ("tls_versions", "ciphersuites", "ciphers"),
    "SSLYZE-003": ("tls_curves", "ecdh_param_size", "dh_param_size"),
    "SSLYZE-004": ("tls_vulnerability_",),
    "SSLYZE-005": ("certificate_", "rsa_key_size", "maximum_certificate_lifespan"),
}


def default_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kmipd-conformance" / f"sslyze-{SSLYZE_VERSION}"


def ensure_sslyze(venv: Path, *, install: bool) -> Path:
    """The Python of a virtual environment with sslyze, created once; raises CaseSkipped."""
    python = venv / "bin" / "python"
    if (venv / _READY_MARK).exists() and python.exists():
        return python
    if not install:
        raise CaseSkipped(f"sslyze is not installed in {venv} and --no-sslyze-install was given")
    try:
        return _install(venv, python)
    except OSError as exc:
        _unavailable(f"cannot create sslyze's virtual environment in {venv}: {exc}")


def _install(venv: Path, python: Path) -> Path:
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f".{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once install it once
        if (venv / _READY_MARK).exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        for command in (
            [sys.executable, "-m", "venv", str(venv)],
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                f"sslyze=={SSLYZE_VERSION}",
            ],
        ):
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
                )
            except subprocess.TimeoutExpired:
                _unavailable(f"installing sslyze took more than {INSTALL_TIMEOUT} s")
            if done.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                _unavailable(
                    f"cannot install sslyze {SSLYZE_VERSION} into {venv}: {' / '.join(tail)}"
                )
        (venv / _READY_MARK).write_text(SSLYZE_VERSION + "\n")
    return python


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        raise CaseFailed(reason + " (under CI this group must run)")
    raise CaseSkipped(reason)


def scan(ctx: Context) -> dict[str, Any]:
    """The one sslyze scan of this run (done by the first case that needs it)."""
    cached = ctx.run.cache.get("sslyze")
    if cached is None:
        try:
            cached = _run_scan(ctx)
        except (CaseFailed, CaseSkipped) as exc:
            cached = exc
        ctx.run.cache["sslyze"] = cached
    if isinstance(cached, BaseException):
        raise cached
    return dict(cached)


def _run_scan(ctx: Context) -> dict[str, Any]:
    python = ensure_sslyze(
        ctx.options.sslyze_venv or default_venv(), install=ctx.options.sslyze_install
    )
    creds = ctx.target.client
    profile = _profile_for(ctx)
    ctx.run.cache["sslyze-profile"] = profile
    command = [
        str(python),
        "-I",  # isolated: this directory's sslyze.py must not shadow the real sslyze
        str(_SCANNER),
        ctx.target.host,
        str(ctx.target.port),
        str(ctx.target.ca),
        str(creds.cert),
        str(creds.key),
        profile,
    ]
    ctx.transcript.add("-- " + " ".join(command))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=SCAN_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise CaseFailed(f"sslyze did not finish within {SCAN_TIMEOUT} s") from None
    if done.returncode != 0:
        raise CaseFailed(f"sslyze failed (status {done.returncode}): {done.stderr.strip()[-500:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _profile_for(ctx: Context) -> str:
    """The Mozilla profile the port is judged by, from its configuration as seen on the wire.

    A port that accepts TLS 1.2 (KMIP on: KMIP clients need it; or tls.allow_tls12) is
    held to "intermediate"; a TLS 1.3-only port (native only) to "modern".
    """
    answer = offer_hello(
        ctx.tcp(),
        client_hello(TLS12, list(ALLOWED_TLS12_SUITES), ctx.target.host),
        ctx.options.timeout,
    )
    profile = "intermediate" if answer.version == TLS12 else "modern"
    ctx.transcript.add(f"-> ClientHello TLS 1.2; <- {answer.describe()}: judged as {profile}")
    return profile


def _findings(ctx: Context, case_id: str) -> None:
    report = scan(ctx)
    if report["error"]:
        raise CaseSkipped(f"the sslyze scan did not complete (SSLYZE-001): {report['error']}")
    issues: dict[str, str] = report["issues"]
    if case_id == "SSLYZE-006":
        owned = tuple(p for prefixes in CRITERIA.values() for p in prefixes)
        mine = {k: v for k, v in issues.items() if not k.startswith(owned)}
    else:
        mine = {k: v for k, v in issues.items() if k.startswith(CRITERIA[case_id])}
    if mine:
        raise CaseFailed("; ".join(f"{k}: {v}" for k, v in sorted(mine.items())))


@case(
    "SSLYZE-001",
    "sslyze, in a virtual environment of its own, completes every scan Mozilla's checker "
    "needs, handshaking with the client's credentials.",
)
def sslyze_scan(ctx: Context) -> None:
    report = scan(ctx)
    if report["error"]:
        raise CaseFailed(report["error"])
    ctx.measurements.update(accepted=report["accepted"], curves=report["curves"])
    versions = ", ".join(sorted(report["accepted"])) or "none"
    profile = ctx.run.cache.get("sslyze-profile", "modern")
    ctx.note(
        f"sslyze {SSLYZE_VERSION}, judged as Mozilla {profile}: accepted {versions}; "
        f"groups {', '.join(report['curves'])}"
    )


@case(
    "SSLYZE-002",
    "sslyze finds only the TLS versions and cipher suites the port's Mozilla profile allows.",
)
def sslyze_versions_and_suites(ctx: Context) -> None:
    _findings(ctx, "SSLYZE-002")


@case(
    "SSLYZE-003",
    "sslyze finds only the key-exchange groups the port's Mozilla profile allows (X25519, "
    "P-256, P-384), with adequate sizes.",
)
def sslyze_groups(ctx: Context) -> None:
    _findings(ctx, "SSLYZE-003")


@case(
    "SSLYZE-004",
    "sslyze finds none of the TLS vulnerabilities it checks (Heartbleed, ROBOT, CCS "
    "injection, compression, insecure renegotiation, no fallback SCSV, no extended master "
    "secret).",
)
def sslyze_vulnerabilities(ctx: Context) -> None:
    _findings(ctx, "SSLYZE-004")


@case(
    "SSLYZE-005",
    "The server certificate meets the port's Mozilla profile: it verifies against --ca, an "
    "ECDSA P-256/P-384 key and signature, a lifespan of at most 90 days.",
)
def sslyze_certificate(ctx: Context) -> None:
    _findings(ctx, "SSLYZE-005")


@case(
    "SSLYZE-006",
    "sslyze reports no other finding against the port's Mozilla profile.",
)
def sslyze_anything_else(ctx: Context) -> None:
    _findings(ctx, "SSLYZE-006")
