"""kmipd's conformance suite: a black-box test of any kmipd server, hostile input included.

Run it against a server with ``python -m conformance --server HOST:PORT --ca ...``,
or against a local ``kmipd serve --dev`` with ``python -m conformance --self-test``.
It talks to the server over the network like any client, from
``protocol.cddl``, PROTOCOL.md and its own code; it imports nothing from the
daemon (``pki`` makes the certificates its TLS probes need).
"""

from conformance._case import GROUPS, Case, Result, Verdict, all_cases, select_cases
from conformance._certs import Credentials
from conformance._cli import main
from conformance._context import Options, Run, Target
from conformance._report import CASES_MD, render_cases_markdown
from conformance._runner import SuiteError, run_cases
from conformance._selftest import SelfTestServer

__all__ = [
    "CASES_MD",
    "GROUPS",
    "Case",
    "Credentials",
    "Options",
    "Result",
    "Run",
    "SelfTestServer",
    "SuiteError",
    "Target",
    "Verdict",
    "all_cases",
    "main",
    "render_cases_markdown",
    "run_cases",
    "select_cases",
]
