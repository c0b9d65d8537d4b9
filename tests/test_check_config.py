"""kmipd check-config, the serving checks, and what a config may say about systemd."""

from __future__ import annotations

import datetime
import os
import socket
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from kmipd.daemon._checks import check_config, check_serving_config
from kmipd.daemon._dev import prepare_dev
from kmipd.daemon.config import ConfigError, load_config, parse_config, render_config
from pki import CertificateAuthority
from tests.processes import run_kmipd


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return prepare_dev(tmp_path / "dev", "127.0.0.1:0")


def rewrite(path: Path, **sections: dict[str, object]) -> None:
    document = tomllib.loads(path.read_text())
    grants = document.pop("grant", [])
    for section, values in sections.items():
        document.setdefault(section, {}).update(values)
    path.write_text(render_config(document, grants))


def test_a_fresh_dev_config_is_fine(config_path: Path) -> None:
    report = check_config(load_config(config_path))
    assert report.problems == []
    assert report.ok


def test_every_problem_is_listed_at_once_each_naming_its_key(
    tmp_path: Path, config_path: Path
) -> None:
    data = config_path.parent
    other = CertificateAuthority.init(tmp_path / "other", trust_domain="kmipd.test")
    (data / "pki" / "server-key.pem").chmod(0o644)  # a private key others can read
    (data / "master.key").chmod(0o640)
    document = tomllib.loads(config_path.read_text())
    grants = document.pop("grant")
    grants.append(
        {"identity": "spiffe://elsewhere.test/x", "namespaces": ["*"], "operations": ["*"]}
    )
    document["tls"]["cert"] = str(other.server_cert_path)  # another CA's, and not our key's
    document["tls"]["crl"] = str(other.crl_path)
    config_path.write_text(render_config(document, grants))
    config_path.chmod(0o664)

    problems = check_config(load_config(config_path)).problems
    text = "\n".join(problems)
    assert "tls.key:" in text
    assert "is accessible to group or others (mode 0644); make it 0600" in text
    assert "tls.cert:" in text
    assert "does not chain to the CA" in text
    assert "is not the key of the certificate" in text
    assert "tls.crl:" in text
    assert "not signed by the CA" in text
    assert "hsm.master_key:" in text
    assert "grant[2].identity: 'spiffe://elsewhere.test/x' can never match" in text
    assert "config:" in text
    assert "writable by group or others" in text
    assert len(problems) == 7, problems

    # The command lists them too, and fails.
    result = run_kmipd("check-config", config_path)
    assert result.returncode == 1
    assert f"{config_path}: {len(problems)} problem(s)" in result.stdout
    for problem in problems:
        assert f"  {problem}" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_syntax_error_is_reported_with_every_key(tmp_path: Path) -> None:
    path = tmp_path / "kmipd.toml"
    path.write_text("[server]\nmax_in_flight = 'x'\nlisten = ['nowhere']\n")
    result = run_kmipd("check-config", path)
    assert result.returncode == 1
    assert "server.max_in_flight: expected an integer, got text" in result.stdout
    assert "tls.ca: required" in result.stdout
    assert "store.path: required" in result.stdout


def test_a_missing_file_and_an_encrypted_key(config_path: Path) -> None:
    data = config_path.parent
    (data / "pki" / "crl.pem").unlink()
    key = serialization.load_pem_private_key(
        (data / "pki" / "server-key.pem").read_bytes(), password=None
    )
    (data / "pki" / "server-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    problems = "\n".join(check_config(load_config(config_path)).problems)
    assert "tls.crl: cannot read" in problems
    assert "crl.pem" in problems
    assert "tls.key:" in problems
    assert "is encrypted" in problems


def test_a_keyring_that_does_not_open(config_path: Path) -> None:
    (config_path.parent / "keyring.cbor").write_bytes(b"not a keyring")
    problems = check_config(load_config(config_path)).problems
    assert problems == [f"hsm.keyring: keyring {config_path.parent / 'keyring.cbor'} is malformed"]


def test_a_certificate_near_its_end_is_a_warning_not_a_problem(config_path: Path) -> None:
    CertificateAuthority.load(config_path.parent / "pki").issue_server(
        dns_names=("localhost",), ip_addresses=("127.0.0.1",), validity_days=10
    )
    report = check_config(load_config(config_path))
    assert report.ok
    assert any("expires on" in warning for warning in report.warnings)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=11)
    assert any(
        "expired" in p for p in check_serving_config(load_config(config_path), now=later).problems
    )
    result = run_kmipd("check-config", config_path)
    assert result.returncode == 0
    assert "warning: tls.cert:" in result.stdout


@pytest.mark.slow
def test_serve_refuses_what_the_serving_checks_refuse(tmp_path: Path, config_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other", trust_domain="kmipd.test")
    rewrite(
        config_path, tls={"cert": str(other.server_cert_path), "key": str(other.server_key_path)}
    )
    result = run_kmipd("serve", "--config", config_path)
    assert result.returncode == 1
    assert "does not chain to the CA" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_port_in_use_is_named_not_a_traceback(config_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        rewrite(config_path, metrics={"listen": f"127.0.0.1:{port}"})
        result = run_kmipd("serve", "--config", config_path)
    assert result.returncode == 1
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


# -- systemd's directories in paths ------------------------------------------------------


def parse(text: str, environ: dict[str, str]) -> object:
    return parse_config(tomllib.loads(text), source="t.toml", base=Path("/base"), environ=environ)


MINIMAL = """
[tls]
ca = "ca.pem"
cert = "server.pem"
key = "${CREDENTIALS_DIRECTORY}/server-key.pem"
crl = "crl.pem"
trust_domain = "t"
[store]
path = "${STATE_DIRECTORY:-/var/lib/kmipd}/kmipd.db"
[hsm]
master_key = "${CREDENTIALS_DIRECTORY}/master.key"
keyring = "keyring.cbor"
"""


def test_directory_variables_expand_with_defaults() -> None:
    config = parse(MINIMAL, {"CREDENTIALS_DIRECTORY": "/run/credentials/kmipd.service"})
    assert config.tls.key == Path("/run/credentials/kmipd.service/server-key.pem")  # type: ignore[attr-defined]
    assert config.store_path == Path("/var/lib/kmipd/kmipd.db")  # type: ignore[attr-defined]
    assert config.keyring == Path("/base/keyring.cbor")  # type: ignore[attr-defined]
    # Several StateDirectory= entries: the first one.
    again = parse(MINIMAL, {"CREDENTIALS_DIRECTORY": "/c", "STATE_DIRECTORY": "/s1:/s2"})
    assert again.store_path == Path("/s1/kmipd.db")  # type: ignore[attr-defined]


def test_an_unset_directory_or_another_variable_is_a_clear_problem() -> None:
    with pytest.raises(ConfigError) as refused:
        parse(MINIMAL.replace("keyring.cbor", "${HOME}/k"), {})
    problems = refused.value.problems
    assert any(
        p.startswith("tls.key: ${CREDENTIALS_DIRECTORY} is not set (not running under systemd?)")
        for p in problems
    )
    assert any(
        p.startswith("hsm.master_key: ${CREDENTIALS_DIRECTORY} is not set") for p in problems
    )
    assert any(
        "hsm.keyring: ${HOME} is not one of the directories systemd passes" in p for p in problems
    )


@pytest.mark.parametrize(
    ("listen", "accepted"),
    [
        ("127.0.0.1:9696", True),
        ("[::1]:9696", True),
        ("localhost:9696", True),
        ("127.0.0.2:9696", True),
        ("0.0.0.0:9696", False),
        ("10.0.0.5:9696", False),
        ("[::]:9696", False),
        ("metrics.example:9696", False),
    ],
)
def test_the_metrics_endpoint_is_loopback_only(listen: str, accepted: bool) -> None:
    text = MINIMAL + f'[metrics]\nlisten = "{listen}"\n'
    environ = {"CREDENTIALS_DIRECTORY": "/c"}
    if accepted:
        assert parse(text, environ).metrics_listen == listen  # type: ignore[attr-defined]
    else:
        with pytest.raises(ConfigError, match=r"metrics\.listen: .* is not a loopback address"):
            parse(text, environ)


def test_metrics_are_off_unless_configured() -> None:
    assert parse(MINIMAL, {"CREDENTIALS_DIRECTORY": "/c"}).metrics_listen is None  # type: ignore[attr-defined]


def test_check_config_of_a_file_that_is_not_there(tmp_path: Path) -> None:
    result = run_kmipd("check-config", tmp_path / "nope.toml")
    assert result.returncode == 1
    assert "cannot read: No such file or directory" in result.stdout
    assert not os.path.exists(tmp_path / "nope.toml")
