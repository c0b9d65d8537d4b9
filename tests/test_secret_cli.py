"""``kmipd secret`` and both clients' secret methods, against a real ``kmipd serve --dev``.

The CLI runs as its own process with the value on stdin or in a file; what it
prints, the files it writes, the daemon's log, its audit trail and its
database files are read back as bytes to show the value only where it belongs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from kmipd import client as km
from kmipd.daemon.config import SECRET_FRAME_HEADROOM, ConfigError, parse_config
from tests.kmip_dev import DevDaemon, dev
from tests.processes import kmipd_command

__all__ = ["dev"]  # the module's daemon fixture

pytestmark = pytest.mark.slow

VALUE_1 = b"replication-password-one\x00\xff"
VALUE_2 = b"replication-password-two"


def env(dev: DevDaemon, identity: str = "admin", namespace: str = "db") -> dict[str, str]:
    ca, cert, key = dev.credentials(identity)
    return {
        **os.environ,
        "KMIPD_SERVER": dev.daemon.address,
        "KMIPD_CA": str(ca),
        "KMIPD_CERT": str(cert),
        "KMIPD_KEY": str(key),
        "KMIPD_NAMESPACE": namespace,
    }


def secret(
    dev: DevDaemon, *args: str | os.PathLike[str], stdin: bytes = b"", identity: str = "admin"
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        kmipd_command("secret", *args),
        input=stdin,
        capture_output=True,
        env=env(dev, identity),
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> Any:
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def refused(result: subprocess.CompletedProcess[bytes], message: bytes) -> None:
    assert result.returncode == 1, result.stdout
    assert message in result.stderr, result.stderr
    assert b"Traceback" not in result.stderr


def client(dev: DevDaemon, identity: str = "admin") -> km.Client:
    ca, cert, key = dev.credentials(identity)
    return km.Client(dev.daemon.address, ca=ca, cert=cert, key=key)


def async_client(dev: DevDaemon, identity: str = "admin") -> km.AsyncClient:
    ca, cert, key = dev.credentials(identity)
    return km.AsyncClient(dev.daemon.address, ca=ca, cert=cert, key=key)


def on_disk(dev: DevDaemon) -> bytes:
    """The database (with its WAL), the audit trail and the daemon's log, as bytes."""
    files = [p for p in dev.data.iterdir() if p.name.startswith(("kmipd.db", "audit", "log"))]
    assert any(p.name == "kmipd.db" for p in files) and any(p.name == "log" for p in files)
    return b"".join(p.read_bytes() for p in files if p.is_file())


def test_secret_lifecycle_through_the_cli(dev: DevDaemon, tmp_path: Path) -> None:
    first = ok(secret(dev, "set", "replication", "--content-type", "text/plain", stdin=VALUE_1))
    assert (first["name"], first["version"], first["size"]) == ("replication", 1, len(VALUE_1))
    source = tmp_path / "value"
    source.write_bytes(VALUE_2)
    second = ok(secret(dev, "set", "replication", "--file", source, "--tag", "owner=dba"))
    assert (second["version"], second["content_type"]) == (2, "text/plain")
    assert second["tags"] == {"owner": "dba"}

    got = secret(dev, "get", "replication")
    assert (got.returncode, got.stdout) == (0, VALUE_2), got.stderr
    assert secret(dev, "get", "replication", "--version", "1").stdout == VALUE_1
    out = tmp_path / "out" / "password"
    out.parent.mkdir()
    written = secret(dev, "get", "replication", "-o", out)
    assert written.returncode == 0, written.stderr
    assert written.stdout == b""
    assert b"version 2" in written.stderr and b"mode 0600" in written.stderr
    assert out.read_bytes() == VALUE_2
    assert out.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in out.parent.iterdir()] == ["password"]  # no partial file left

    listed = secret(dev, "list")
    [entry] = [s for s in ok(listed) if s["name"] == "replication"]
    assert (entry["namespace"], entry["versions"], entry["latest"]["version"]) == ("db", 2, 2)
    versions = secret(dev, "versions", "replication")
    assert [v["version"] for v in ok(versions)] == [1, 2]
    for shown in (listed, versions, written):
        assert VALUE_1 not in shown.stdout + shown.stderr
        assert VALUE_2 not in shown.stdout + shown.stderr

    # Disabling version 2 makes version 1 the one read; dates are set and cleared.
    assert ok(secret(dev, "update", "replication", "--disable"))["enabled"] is False
    assert secret(dev, "get", "replication").stdout == VALUE_1
    enabled = ok(secret(dev, "update", "replication", "--version", "2", "--enable"))
    assert enabled["enabled"] is True
    dated = ok(secret(dev, "update", "replication", "--expires", "2099-01-01T00:00:00Z"))
    assert dated["expires"] == 4070908800
    assert ok(secret(dev, "update", "replication", "--expires", "none"))["expires"] is None

    ok(secret(dev, "delete", "replication"))
    refused(secret(dev, "get", "replication"), b"recover it first")
    assert [s["name"] for s in ok(secret(dev, "list", "--deleted"))] == ["replication"]
    ok(secret(dev, "recover", "replication"))
    assert secret(dev, "get", "replication").stdout == VALUE_2

    refused(secret(dev, "purge", "replication"), b"delete it first")
    ok(secret(dev, "delete", "replication"))
    purged = ok(secret(dev, "purge", "replication"))
    assert purged["name"] == "replication"
    refused(secret(dev, "get", "replication"), b"no secret 'replication' in namespace 'db'")

    # Never in the clear in the database, the audit trail or the daemon's log.
    disk = on_disk(dev)
    assert VALUE_1 not in disk and VALUE_2 not in disk
    audited = {
        r["operation"] for r in dev.audit_records() if "'replication'" in (r.get("detail") or "")
    }
    assert audited >= {"set-secret", "get-secret", "update-secret", "delete-secret"}
    assert audited >= {"recover-secret", "purge-secret", "secret-versions"}


def test_bad_input_is_refused_clearly_and_loses_nothing(dev: DevDaemon, tmp_path: Path) -> None:
    ok(secret(dev, "set", "api-token", stdin=b"token-v1"))

    in_argv = secret(dev, "set", "api-token", "hunter2-in-argv")
    refused(in_argv, b"never taken from the command line")
    assert b"hunter2" not in in_argv.stderr + in_argv.stdout  # not echoed
    as_flag = secret(dev, "set", "api-token", "--value", "hunter2-in-argv")
    refused(as_flag, b"never taken from the command line")
    assert b"hunter2" not in as_flag.stderr + as_flag.stdout
    refused(secret(dev, "set", "api-token", stdin=b""), b"the value on stdin is empty")
    refused(secret(dev, "set", "api-token", "--file", tmp_path / "nope"), b"No such file")
    refused(
        secret(dev, "set", "api-token", stdin=b"x" * (64 * 1024 + 1)),
        b"secrets.max_size is 65536",
    )
    refused(secret(dev, "set", "api-token", "--tag", "novalue", stdin=b"x"), b"expected KEY=VALUE")
    no_namespace = subprocess.run(
        kmipd_command("secret", "get", "api-token"),
        capture_output=True,
        env={k: v for k, v in env(dev).items() if k != "KMIPD_NAMESPACE"},
        timeout=60,
        check=False,
    )
    refused(no_namespace, b"which namespace?")

    refused(secret(dev, "get", "no-such"), b"no secret 'no-such' in namespace 'db'")
    refused(secret(dev, "get", "api-token", "--version", "7"), b"has no version 7")
    bad_date = secret(dev, "update", "api-token", "--expires", "next tuesday")
    assert bad_date.returncode == 2  # a usage error, from argparse
    assert b"neither ISO 8601 nor epoch seconds" in bad_date.stderr
    refused(secret(dev, "get", "api-token", "-o", tmp_path / "no-dir" / "f"), b"No such file")
    ok(secret(dev, "set", "later", "--not-before", "2099-01-01", stdin=b"early"))
    refused(secret(dev, "get", "later"), b"is not valid before 4070908800")
    ok(secret(dev, "set", "old", "--expires", "2000-01-01T00:00:00Z", stdin=b"late"))
    refused(secret(dev, "get", "old"), b"expired at 946684800")
    refused(secret(dev, "get", "api-token", identity="storage"), b"not-authorized")
    refused(secret(dev, "set", "a" * 300, stdin=b"x"), b"bad-request")

    # Nothing was lost or added: one version, the original value.
    assert [v["version"] for v in ok(secret(dev, "versions", "api-token"))] == [1]
    assert secret(dev, "get", "api-token").stdout == b"token-v1"


def test_every_refusal_reaches_the_client_as_its_own_exception(dev: DevDaemon) -> None:
    now = int(time.time())
    value = b"refusal-test-value-7c1e"
    with client(dev) as kms:
        kms.set_secret("apps", "r", value)

        def refusal(cls: type[km.KmipdError], call: Any, *args: Any, **kwargs: Any) -> None:
            with pytest.raises(cls) as caught:
                call(*args, **kwargs)
            assert value.decode() not in str(caught.value)

        with client(dev, "storage") as storage:  # data grants only
            refusal(km.NotAuthorizedError, storage.get_secret, "apps", "r")
            refusal(km.NotAuthorizedError, storage.set_secret, "apps", "r", value)
            refusal(km.NotAuthorizedError, storage.list_secrets)
        refusal(km.UnknownSecretVersionError, kms.get_secret, "apps", "r", 2)
        refusal(km.NotFoundError, kms.get_secret, "apps", "nope")
        refusal(km.SecretTooLargeError, kms.set_secret, "apps", "r", b"x" * (64 * 1024 + 1))
        kms.set_secret("apps", "later", value, not_before=now + 3600)
        refusal(km.SecretNotYetValidError, kms.get_secret, "apps", "later")
        kms.set_secret("apps", "past", value, expires=now - 1)
        refusal(km.SecretExpiredError, kms.get_secret, "apps", "past")
        kms.update_secret("apps", "r", enabled=False)
        refusal(km.SecretDisabledError, kms.get_secret, "apps", "r")
        refusal(km.SecretDisabledError, kms.get_secret, "apps", "r", 1)
        kms.delete_secret("apps", "r")
        refusal(km.SecretDeletedError, kms.get_secret, "apps", "r")
        refusal(km.WrongStateError, kms.recover_secret, "apps", "past")
        refusal(km.BadRequestError, kms.update_secret, "apps", "past", not_before=9, expires=8)
        # Nothing was lost: recovered and enabled, version 1 reads as it was set.
        kms.recover_secret("apps", "r")
        kms.update_secret("apps", "r", enabled=True)
        with kms.get_secret("apps", "r") as got:
            assert (got.version, bytes(got.value)) == (1, value)
    assert value not in on_disk(dev)


def test_both_clients_hand_out_redacted_protected_values(dev: DevDaemon) -> None:
    with client(dev) as kms:
        info = kms.set_secret("vault", "s3-key", b"AKIA-secret-value", tags={"app": "backup"})
        assert (info.version, info.size, info.tags) == (1, 17, {"app": "backup"})
        got = kms.get_secret("vault", "s3-key")
        assert isinstance(got, km.Secret)
        assert isinstance(got.protected, km.ProtectedValue)
        assert "AKIA" not in repr(got) and "AKIA" not in str(got)
        assert "ProtectedValue 17 bytes" in repr(got)
        assert got.value == b"AKIA-secret-value"
        assert got.value_bytes() == b"AKIA-secret-value"
        assert (got.tags, got.content_type) == ({"app": "backup"}, "application/octet-stream")
        got.close()
        with pytest.raises(km.KeyWipedError):
            got.value  # noqa: B018 - the access is the test

    async def use_async() -> None:
        async with async_client(dev) as kms:
            await kms.set_secret("vault", "s3-key", b"AKIA-second", content_type="text/plain")
            with await kms.get_secret("vault", "s3-key") as newest:
                assert (newest.version, bytes(newest.value)) == (2, b"AKIA-second")
                assert "AKIA" not in repr(newest)
            assert newest.protected.wiped
            with await kms.get_secret("vault", "s3-key", version=1) as first:
                assert bytes(first.value) == b"AKIA-secret-value"
            await kms.update_secret("vault", "s3-key", version=1, enabled=False)
            versions = await kms.secret_versions("vault", "s3-key")
            assert [(v.version, v.enabled) for v in versions] == [(1, False), (2, True)]
            assert [s.name for s in await kms.list_secrets("vault")] == ["s3-key"]
            await kms.delete_secret("vault", "s3-key")
            assert [s.name for s in await kms.list_secrets("va*", deleted=True)] == ["s3-key"]
            await kms.purge_secret("vault", "s3-key")
            with pytest.raises(km.NotFoundError):
                await kms.get_secret("vault", "s3-key")

    trio.run(use_async)


def test_list_pages_through_more_than_one_page(dev: DevDaemon) -> None:
    with client(dev) as kms:
        for n in range(1001):
            kms.set_secret("many", f"s{n:04d}", b"v")
        listed = kms.list_secrets("many")
        assert len(listed) == 1001
        assert [s.name for s in listed[:2]] == ["s0000", "s0001"]


def test_a_value_of_the_largest_size_fits_the_frames_and_a_larger_one_is_refused(
    dev: DevDaemon,
) -> None:
    largest = os.urandom(64 * 1024)  # secrets.max_size, the default
    with client(dev) as kms:
        assert kms.set_secret("frames", "big", largest).size == len(largest)
        with kms.get_secret("frames", "big") as got:
            assert got.value == largest
        # Above the frame limit the client refuses it before sending: a clear error,
        # and the connection, with anything else in flight on it, is not cut.
        with pytest.raises(km.FrameTooLargeError, match=r"max_frame_size.*nothing was sent"):
            kms.set_secret("frames", "big", b"x" * (100 * 1024))
        assert [v.version for v in kms.secret_versions("frames", "big")] == [1]

    async def use_async() -> None:
        async with async_client(dev) as kms:
            with await kms.get_secret("frames", "big") as got:
                assert got.value == largest
            with pytest.raises(km.FrameTooLargeError):
                await kms.set_secret("frames", "big", b"x" * (100 * 1024))
            assert (await kms.status()).hsm.endswith("ok")

    trio.run(use_async)


def test_a_secret_max_size_no_frame_can_carry_is_a_config_problem() -> None:
    base: dict[str, Any] = {
        "tls": dict.fromkeys(("ca", "cert", "key", "crl", "trust_domain"), "x"),
        "store": {"path": "kmipd.db"},
        "hsm": {"master_key": "m", "keyring": "k"},
    }
    config = parse_config(base, source="t.toml", base=Path("/base"))
    assert config.secret_max_size + SECRET_FRAME_HEADROOM <= config.limits.max_frame_size
    with pytest.raises(ConfigError) as refused:
        parse_config({**base, "secrets": {"max_size": 1 << 20}}, source="t.toml", base=Path("/"))
    assert refused.value.problems == [
        "secrets.max_size: a secret of 1048576 bytes cannot reach the daemon in a frame of "
        "server.max_frame_size = 73728 bytes: raise server.max_frame_size to at least "
        "1056768 (the value and 8192 bytes for its name and attributes), or lower "
        "secrets.max_size"
    ]
    bigger = {**base, "secrets": {"max_size": 1 << 20}, "server": {"max_frame_size": 1056768}}
    assert parse_config(bigger, source="t.toml", base=Path("/")).secret_max_size == 1 << 20
