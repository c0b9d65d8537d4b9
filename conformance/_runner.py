"""Runs the selected cases against a target and collects their results.

Before any case, a preflight connects as --cert, negotiates the version and
creates a baseline DEK; after every hostile case a fresh client must still
get that same DEK back (liveness). Cases that mostly wait for a server
timeout run in the background from the start; cases that stop the server
(self-test only) run last.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable

from conformance._case import (
    Case,
    CaseFailed,
    CaseSkipped,
    Informational,
    Result,
    Verdict,
    When,
)
from conformance._certs import CertificateFactory
from conformance._connection import ConnectionClosed, NoResponse
from conformance._context import Context, Run, certificate_identity


class SuiteError(Exception):
    """The suite cannot start: the server is unreachable or refuses the given client."""


def preflight(run: Run) -> None:
    context = Context(run)
    try:
        with context.connect(label="preflight", hello=False) as connection:
            reply = context.hello(connection)
            hello = context.expect_result(reply, "hello-result")
            created = context.expect_result(
                context.request(connection, "create-dek", {"namespace": run.namespace("baseline")}),
                "dek-result",
            )
    except (OSError, ssl.SSLError, ConnectionClosed, NoResponse, CaseFailed) as exc:
        lines = "\n  ".join(context.transcript.tail())
        raise SuiteError(
            f"cannot run the suite against {run.target.address} as {run.target.client.cert}: "
            f"{exc}\n  {lines}"
        ) from None
    run.hello = hello
    run.identity = str(hello["identity"])
    run.baseline = (str(created["dek-id"]), bytes(created["key"]))
    expected = certificate_identity(run.target.client.cert)
    trust_domain = (expected or run.identity).removeprefix("spiffe://").split("/", 1)[0]
    run.certs = CertificateFactory(
        scratch=run.scratch / "certs",
        trust_domain=trust_domain,
        ca_cert=run.target.ca,
        ca_key=run.target.ca_key,
        ca_dir=run.target.ca_dir,
        other_ca=run.target.other_ca,
        revoked=run.target.revoked,
    )


def run_case(run: Run, case: Case) -> Result:
    context = Context(run)
    started = time.monotonic()
    verdict, detail = Verdict.PASS, ""
    try:
        case.run(context)
    except CaseFailed as exc:
        verdict, detail = Verdict.FAIL, str(exc)
    except CaseSkipped as exc:
        verdict, detail = Verdict.SKIP, str(exc)
    except Informational as exc:
        verdict, detail = Verdict.INFO, str(exc)
    except (ConnectionClosed, NoResponse) as exc:
        verdict, detail = Verdict.FAIL, f"{type(exc).__name__}: {exc}"
    except (OSError, ssl.SSLError) as exc:
        verdict, detail = Verdict.FAIL, f"network error: {exc!r}"
    finally:
        context.close_all()
    if case.hostile and verdict in (Verdict.PASS, Verdict.FAIL):
        try:
            context.check_alive()
        except CaseFailed as exc:
            verdict = Verdict.FAIL
            detail = (detail + "; " if detail else "") + f"liveness: {exc}"
        finally:
            context.close_all()
    if context.notes and verdict is not Verdict.FAIL:
        detail = "; ".join(([detail] if detail else []) + context.notes)
    evidence = context.transcript.tail() if verdict is Verdict.FAIL else []
    return Result(
        case,
        verdict,
        detail,
        evidence,
        dict(context.measurements),
        round(time.monotonic() - started, 3),
    )


def run_cases(
    run: Run, cases: list[Case], *, report: Callable[[Result], None] = lambda r: None
) -> list[Result]:
    """Run ``cases``; ``report`` is called with each result as it is known."""
    preflight(run)
    results: dict[str, Result] = {}
    background = [c for c in cases if c.when is When.BACKGROUND]
    threads = []
    for case in background:

        def run_in_background(case: Case = case) -> None:
            results[case.id] = run_case(run, case)

        thread = threading.Thread(target=run_in_background, name=case.id, daemon=True)
        thread.start()
        threads.append(thread)
    for case in cases:
        if case.when is When.IN_ORDER:
            results[case.id] = run_case(run, case)
            report(results[case.id])
    for thread, case in zip(threads, background, strict=True):
        thread.join()
        report(results[case.id])
    for case in cases:
        if case.when is When.LAST:
            results[case.id] = run_case(run, case)
            report(results[case.id])
    return [results[c.id] for c in cases]
