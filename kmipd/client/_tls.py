"""The client's TLS policy: TLS 1.3, verify the server's certificate and name."""

from __future__ import annotations

import ssl
from pathlib import Path

from kmipd.client._errors import KmipdError
from kmipd.net._tls_policy import KEY_EXCHANGE_GROUP


def client_context(
    *, ca: str | Path, cert: str | Path, key: str | Path, allow_tls12: bool = False
) -> ssl.SSLContext:
    """An SSLContext that presents our certificate and trusts only the kmipd CA.

    ``create_default_context`` turns on hostname checking and checks the
    server certificate's serverAuth usage (OpenSSL's ssl_server purpose).
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise KmipdError(f"cannot load CA certificate {ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2 if allow_tls12 else ssl.TLSVersion.TLSv1_3
    # kmipd servers accept only this group (see kmipd.server._tls): offering its
    # key share first saves the HelloRetryRequest round trip on every connect.
    context.set_ecdh_curve(KEY_EXCHANGE_GROUP)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise KmipdError(f"cannot load client certificate {cert} with key {key}: {exc}") from None
    return context
