"""The trio server: TLS listeners, one task per connection, limits, drain."""

from kmipd.server._kmip_conn import KmipSettings
from kmipd.server._listen import open_listeners
from kmipd.server._server import KmipServer, ServerLimits
from kmipd.server._tls import (
    TLS12_CIPHERS,
    PeerRejectedError,
    ServerTls,
    TlsConfigError,
    TlsSettings,
)

__all__ = [
    "TLS12_CIPHERS",
    "KmipServer",
    "KmipSettings",
    "PeerRejectedError",
    "ServerLimits",
    "ServerTls",
    "TlsConfigError",
    "TlsSettings",
    "open_listeners",
]
