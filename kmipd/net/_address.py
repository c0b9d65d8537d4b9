"""Network addresses as operators write them: ``HOST:PORT``, IPv6 in brackets."""

from __future__ import annotations


def parse_address(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:5696`` for IPv6); ValueError names the problem."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"address {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" not in text:
        host, port_text = text, ""
    else:
        raise ValueError(f"address {text!r}: write an IPv6 address in brackets, [::1]:5696")
    if not host:
        raise ValueError(f"address {text!r}: the host is empty")
    if not port_text:
        if default_port is None:
            raise ValueError(f"address {text!r}: the port is missing (HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"address {text!r}: the port must be a number 0..65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
