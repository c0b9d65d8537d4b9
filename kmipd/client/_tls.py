"""The client's TLS policy: TLS 1.3, verify the server's certificate and name."""

from __future__ import annotations

import os
import ssl
import threading
from collections import OrderedDict
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


#: Contexts that Clients built from the same files share (most recent last).
_SHARED: OrderedDict[tuple[object, ...], ssl.SSLContext] = OrderedDict()
_SHARED_LOCK = threading.Lock()
_SHARED_MAX = 16


def _file_identity(path: str | Path) -> tuple[object, ...]:
    status = os.stat(path)
    return (os.path.abspath(path), status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)


def shared_client_context(*, ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """``client_context`` for a Client, made once per set of files as they are now.

    Loading the CA and the key pair is ~0.9 ms of OpenSSL decoding, more than a
    TLS 1.3 handshake's client side: a program that makes a Client per task
    pays it once. A file replaced (new inode, mtime or size) is a new key, so
    a renewed certificate or a rotated CA is loaded afresh. The context is
    never changed after it is made (a renewing Client uses its own), so
    sharing it is safe across Clients and threads.
    """
    try:
        identity = (_file_identity(ca), _file_identity(cert), _file_identity(key))
    except OSError:
        return client_context(ca=ca, cert=cert, key=key)  # the same error as unshared
    with _SHARED_LOCK:
        context = _SHARED.get(identity)
        if context is not None:
            _SHARED.move_to_end(identity)
            return context
    context = client_context(ca=ca, cert=cert, key=key)
    with _SHARED_LOCK:
        _SHARED[identity] = context
        while len(_SHARED) > _SHARED_MAX:
            _SHARED.popitem(last=False)
    return context
