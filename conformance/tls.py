"""TLS policy: who may finish a handshake, with which versions and suites, and the server's
certificate. The refused client must get the alert that says why (PROTOCOL.md section 1)."""

from __future__ import annotations

import ssl
import time

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from conformance._case import CaseFailed, case
from conformance._certs import Credentials
from conformance._connection import parse_response
from conformance._context import Context
from conformance._tlsprobe import (
    ALLOWED_TLS12_SUITES,
    FORBIDDEN_SUITES,
    TLS10,
    TLS11,
    TLS12,
    HandshakeOutcome,
    client_hello,
    handshake_probe,
    offer_hello,
)
from conformance._wire import request_frame

#: How long a revocation may take to reach new handshakes (the daemon: within a second).
CRL_PICKUP = 5.0


def _probe(ctx: Context, creds: Credentials | None, label: str) -> HandshakeOutcome:
    outcome = handshake_probe(
        ctx.tcp(),
        ca=ctx.target.ca,
        host=ctx.target.host,
        creds=creds,
        first_request=request_frame(1, "hello", {"versions": [1]}),
        timeout=ctx.options.timeout,
    )
    ctx.transcript.add(f"-- {label}: {outcome.describe()}")
    if outcome.first_frame is not None:
        message = parse_response(outcome.first_frame, ctx.schema)
        ctx.run.observe(message)
        ctx.transcript.add(f"<- {label} {message.summary()}")
    return outcome


def _expect_alert(ctx: Context, creds: Credentials | None, label: str, alert: str) -> None:
    outcome = _probe(ctx, creds, label)
    if outcome.first_frame is not None:
        raise CaseFailed(f"{label}: the server accepted the client and answered its hello")
    if outcome.alert != alert:
        raise CaseFailed(
            f"{label}: refused, but with {outcome.alert or 'no alert'} ({outcome.ended}); "
            f"PROTOCOL.md names the reason with the {alert} alert"
        )
    ctx.note(f"{label}: {alert}")


@case(
    "TLS-001",
    "A client that presents no certificate is refused with the certificate_required alert.",
    hostile=True,
)
def no_client_certificate(ctx: Context) -> None:
    _expect_alert(ctx, None, "no certificate", "certificate_required")


@case(
    "TLS-002",
    "A client certificate from another CA (same trust domain and name shape) is refused "
    "with the unknown_ca alert.",
    hostile=True,
)
def other_ca(ctx: Context) -> None:
    _expect_alert(ctx, ctx.certs.from_other_ca(), "other CA", "unknown_ca")


@case(
    "TLS-003",
    "An expired client certificate from the server's CA is refused with the "
    "certificate_expired alert.",
    hostile=True,
)
def expired(ctx: Context) -> None:
    _expect_alert(ctx, ctx.certs.expired(), "expired", "certificate_expired")


@case(
    "TLS-004",
    "A revoked client certificate is refused with the certificate_revoked alert (within "
    "seconds of the CRL naming it).",
    hostile=True,
)
def revoked(ctx: Context) -> None:
    creds = ctx.certs.revoked()
    deadline = time.monotonic() + CRL_PICKUP
    while True:
        outcome = _probe(ctx, creds, "revoked")
        if outcome.first_frame is None or time.monotonic() > deadline:
            break
        time.sleep(0.25)  # the server has not read the new CRL yet; no event tells us when
    if outcome.first_frame is not None:
        raise CaseFailed(
            f"a revoked certificate was still accepted {CRL_PICKUP:g} s after revocation"
        )
    if outcome.alert != "certificate_revoked":
        raise CaseFailed(f"refused, but with {outcome.alert or 'no alert'} ({outcome.ended})")


@case(
    "TLS-005",
    "A client certificate whose extendedKeyUsage has serverAuth but not clientAuth is refused "
    "with the unsupported_certificate alert.",
    hostile=True,
)
def server_auth_only(ctx: Context) -> None:
    _expect_alert(ctx, ctx.certs.server_auth_only(), "serverAuth-only", "unsupported_certificate")


def _rejected_after_handshake(ctx: Context, creds: Credentials, label: str) -> None:
    outcome = _probe(ctx, creds, label)
    if not outcome.completed:
        ctx.note(f"{label}: refused during the handshake ({outcome.alert or outcome.ended})")
        return
    if outcome.first_frame is None:
        raise CaseFailed(
            f"{label}: the server closed ({outcome.ended}) without certificate-rejected"
        )
    message = parse_response(outcome.first_frame, ctx.schema)
    ctx.expect_error(message, "certificate-rejected", request_id=None)
    ctx.note(f"{label}: certificate-rejected: {message.error_message}")


@case(
    "TLS-006",
    "A client certificate with no extendedKeyUsage at all is refused: an unattributed "
    "certificate-rejected right after the handshake (or an alert during it), never served.",
    hostile=True,
)
def without_eku(ctx: Context) -> None:
    _rejected_after_handshake(ctx, ctx.certs.without_eku(), "no EKU")


@case(
    "TLS-007",
    "A certificate from the server's CA whose SPIFFE ID is in another trust domain is refused "
    "with an unattributed certificate-rejected, never served.",
    hostile=True,
)
def foreign_trust_domain(ctx: Context) -> None:
    _rejected_after_handshake(ctx, ctx.certs.foreign_trust_domain(), "foreign trust domain")


def _old_version_refused(ctx: Context, version: int, name: str) -> None:
    suites = [*ALLOWED_TLS12_SUITES, *FORBIDDEN_SUITES]
    answer = offer_hello(
        ctx.tcp(), client_hello(version, suites, ctx.target.host), ctx.options.timeout
    )
    ctx.transcript.add(
        f"-> ClientHello {name} offering {len(suites)} suites; <- {answer.describe()}"
    )
    if answer.kind == "server-hello":
        raise CaseFailed(f"the server accepted {name}: {answer.describe()}")
    ctx.note(answer.describe())


@case(
    "TLS-008",
    "A ClientHello offering only TLS 1.0 gets no ServerHello (an alert or a close).",
    hostile=True,
)
def tls10_refused(ctx: Context) -> None:
    _old_version_refused(ctx, TLS10, "TLS 1.0")


@case(
    "TLS-009",
    "A ClientHello offering only TLS 1.1 gets no ServerHello (an alert or a close).",
    hostile=True,
)
def tls11_refused(ctx: Context) -> None:
    _old_version_refused(ctx, TLS11, "TLS 1.1")


@case(
    "TLS-010",
    "TLS 1.2 is refused, or accepted only with ECDHE and AES-GCM/ChaCha20-Poly1305: the "
    "server never picks a forbidden suite, even when offered nothing else.",
    hostile=True,
)
def tls12_suites(ctx: Context) -> None:
    everything = [*FORBIDDEN_SUITES, *ALLOWED_TLS12_SUITES]  # forbidden ones first, on purpose
    answer = offer_hello(
        ctx.tcp(), client_hello(TLS12, everything, ctx.target.host), ctx.options.timeout
    )
    ctx.transcript.add(f"-> ClientHello TLS 1.2, all suites; <- {answer.describe()}")
    if answer.kind != "server-hello":
        ctx.note(f"TLS 1.2 not accepted ({answer.describe()})")
        return
    ctx.expect(answer.version == TLS12, f"answered a TLS 1.2 hello with {answer.describe()}")
    ctx.expect(
        answer.suite in ALLOWED_TLS12_SUITES, f"picked a forbidden suite: {answer.describe()}"
    )
    for suite, name in FORBIDDEN_SUITES.items():
        only = offer_hello(
            ctx.tcp(), client_hello(TLS12, [suite], ctx.target.host), ctx.options.timeout
        )
        if only.kind == "server-hello":
            ctx.transcript.add(f"-> ClientHello TLS 1.2 offering only {name}; <- {only.describe()}")
            raise CaseFailed(f"TLS 1.2 with {name} alone was accepted")
    picked = ALLOWED_TLS12_SUITES[answer.suite or 0]
    ctx.note(
        f"TLS 1.2 on, picked {picked}; each of {len(FORBIDDEN_SUITES)} forbidden suites refused"
    )


@case(
    "TLS-011",
    "A client with a valid certificate completes a TLS 1.3 handshake with an AEAD suite and "
    "is served.",
)
def tls13_accepted(ctx: Context) -> None:
    outcome = _probe(ctx, ctx.target.client, "valid client")
    ctx.expect(outcome.first_frame is not None, f"not served: {outcome.describe()}")
    ctx.expect(outcome.version == "TLSv1.3", f"negotiated {outcome.version}, not TLS 1.3")
    ctx.note(f"{outcome.version} {outcome.cipher}")


@case(
    "TLS-012",
    "The server's certificate chains to --ca, names the host dialled (DNS or IP SAN), and "
    "carries the serverAuth extended key usage.",
)
def server_certificate(ctx: Context) -> None:
    context = ctx.tls_context(ctx.target.client)  # verifies the chain and the host name
    try:
        with context.wrap_socket(ctx.tcp(), server_hostname=ctx.target.host) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        raise CaseFailed(
            f"the server's certificate does not verify: {exc.verify_message}"
        ) from None
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CaseFailed("the server's certificate has no extendedKeyUsage") from None
    ctx.expect(
        ExtendedKeyUsageOID.SERVER_AUTH in usages, "the server's certificate lacks serverAuth"
    )
    ctx.note(f"{cert.subject.rfc4514_string()}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")
