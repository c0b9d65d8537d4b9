"""The software HSM's keyring in the PostgreSQL store: one keyring for every daemon.

Each daemon is given the same master key file (as Vault's nodes share an
unseal key) and no keyring file: a KEK, a rotation or a signing key made
through one daemon is used by the others, a destroy through one is gone
from all of them, and a daemon given another master key is refused.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import psycopg
import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from kmipd.client import Client
from kmipd.hsm import HsmError, HsmKeyNotFoundError, create_master_key
from kmipd.protocol import CreateDek, Destroy, ErrorCode, GetDek, KeyRef, Revoke, RotateKek
from kmipd.service import KeyService, ServiceError
from pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN, credentials
from tests.processes import Daemon, run_kmipd
from tests.test_pkcs11 import SoftToken, softhsm, write_config
from tests.test_postgres import ADMIN, STORAGE, Daemons, count, daemons, start_on_postgres

__all__ = ["daemons", "softhsm"]  # fixtures used here too


def keyring_rows(conninfo: str, kind: str) -> int:
    return count(conninfo, f"SELECT count(*) FROM hsm_keyring WHERE kind = '{kind}'")


async def test_a_kek_and_its_rotation_made_through_one_daemon_serve_on_another(
    daemons: Daemons,
) -> None:
    a, b = await daemons.start_shared(), await daemons.start_shared()
    dek = await a.handle(STORAGE, CreateDek(namespace="orders"))
    # b never held this KEK: it fetches it from the store's keyring.
    assert (await b.handle(STORAGE, GetDek(dek_id=dek.dek_id))).key == dek.key
    await b.handle(ADMIN, RotateKek(name="orders"))
    await a.store.refresh_if_changed()
    newer = await a.handle(STORAGE, CreateDek(namespace="orders"))  # wrapped under b's v2
    assert newer.kek_version == 2
    assert (await b.handle(STORAGE, GetDek(dek_id=newer.dek_id))).key == newer.key
    assert (await a.handle(STORAGE, GetDek(dek_id=dek.dek_id))).key == dek.key
    assert keyring_rows(daemons.conninfo, "kek") == 2
    # What the table holds is sealed KEKs: no DEK appears in it.
    with psycopg.connect(daemons.conninfo) as db:
        sealed = b"".join(bytes(r[0]) for r in db.execute("SELECT sealed FROM hsm_keyring"))
    assert dek.key not in sealed
    assert newer.key not in sealed


async def test_two_daemons_creating_one_kek_at_once_leave_one_kek_in_the_keyring(
    daemons: Daemons,
) -> None:
    a, b = await daemons.start_shared(), await daemons.start_shared()
    made: dict[str, list[bytes]] = {}

    async def create(service: KeyService, namespace: str) -> None:
        result = await service.handle(STORAGE, CreateDek(namespace=namespace))
        made.setdefault(result.dek_id, []).append(result.key)

    names = [f"race-{n}" for n in range(6)]
    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(create, a, name)
            nursery.start_soon(create, b, name)
    assert count(daemons.conninfo, "SELECT count(*) FROM keks") == len(names)
    # The loser of each race destroyed the KEK it made in the keyring: no orphans.
    assert keyring_rows(daemons.conninfo, "kek") == len(names)
    for dek_id, (key,) in made.items():
        for service in (a, b):
            assert (await service.handle(STORAGE, GetDek(dek_id=dek_id))).key == key


async def test_a_kek_destroyed_through_one_daemon_is_gone_from_every_daemon(
    daemons: Daemons,
) -> None:
    a, b = await daemons.start_shared(), await daemons.start_shared()
    dek = await a.handle(STORAGE, CreateDek(namespace="orders"))
    assert (await b.handle(STORAGE, GetDek(dek_id=dek.dek_id))).key == dek.key
    kek = b.store.get_kek("orders")
    assert kek is not None
    handle = kek.latest.hsm_handle
    record = await b.store.get_dek(dek.dek_id)
    assert record is not None
    wrapped = record.wrapped
    aad = b"any associated data"
    probe = await b.hsm.wrap(handle, b"k" * 32, aad)  # b holds the KEK in memory now
    assert b.hsm.unwrap_now(handle, probe, aad) == b"k" * 32

    version = KeyRef(kek="orders", version=1)
    await a.handle(ADMIN, Revoke(key=version, reason="cessation-of-operation"))
    await a.handle(ADMIN, Destroy(key=version, force=True, purge_now=True))
    assert keyring_rows(daemons.conninfo, "kek") == 0
    with trio.fail_after(1):  # b's listener hears of the removal and drops the KEK
        while b.hsm.unwrap_now(handle, probe, aad) is not None:  # noqa: ASYNC110 - another thread
            await trio.sleep(0.005)
    with pytest.raises(HsmKeyNotFoundError):
        await b.hsm.unwrap(handle, wrapped, aad)
    with pytest.raises(HsmKeyNotFoundError):
        await a.hsm.unwrap(handle, probe, aad)
    await b.store.refresh_if_changed()
    with pytest.raises(ServiceError) as refused:
        await b.handle(STORAGE, GetDek(dek_id=dek.dek_id))
    assert refused.value.code is ErrorCode.KEY_DESTROYED


async def test_a_signing_key_made_through_one_daemon_signs_on_another(
    daemons: Daemons,
) -> None:
    a, b = await daemons.start_shared(), await daemons.start_shared()
    handle = await a.hsm.generate_signing_key("online-ca", "p256")  # the online CA's key
    public = load_der_public_key(await b.hsm.signing_public_key(handle))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    signature = await b.hsm.sign(handle, b"a CRL")
    public.verify(signature, b"a CRL", ec.ECDSA(hashes.SHA256()))  # raises if not a's key
    assert keyring_rows(daemons.conninfo, "signing") == 1
    await b.hsm.destroy_signing_key(handle)
    with trio.fail_after(1):
        while True:
            try:
                await a.hsm.sign(handle, b"a CRL")
            except HsmKeyNotFoundError:
                break
            await trio.sleep(0.005)  # a's listener thread drops it on the notification
    with pytest.raises(HsmKeyNotFoundError):
        await b.hsm.destroy_signing_key(handle)


async def test_a_daemon_given_another_master_key_is_refused_and_changes_nothing(
    tmp_path: Path, daemons: Daemons
) -> None:
    a = await daemons.start_shared()
    dek = await a.handle(STORAGE, CreateDek(namespace="orders"))
    other = tmp_path / "other.key"
    create_master_key(other)
    with pytest.raises(HsmError) as refused:
        await daemons.start_shared(master=other)
    assert str(refused.value) == (
        f"the keyring in the PostgreSQL store at {a.store.where} is sealed under another "
        "master key: every daemon on one store must be given the same hsm.master_key"
    )
    assert keyring_rows(daemons.conninfo, "kek") == 1
    assert keyring_rows(daemons.conninfo, "check") == 1
    b = await daemons.start_shared()  # the right key still works
    assert (await b.handle(STORAGE, GetDek(dek_id=dek.dek_id))).key == dek.key


# -- real daemons ---------------------------------------------------------------------------------


def without_keyring_file(config: Path) -> None:
    text, found = re.subn(r'\nkeyring = "[^"]*"', "", config.read_text())
    assert found == 1
    config.write_text(text)


@pytest.mark.slow
def test_daemons_with_the_software_hsm_share_the_keyring_in_the_store(
    tmp_path: Path, postgres_db: str
) -> None:
    daemons, creds, data, config = start_on_postgres(tmp_path, postgres_db, 0)
    (data / "keyring.cbor").unlink(missing_ok=True)
    # Two "machines": each its own directory, holding its own copy of the master key.
    configs = []
    for n in range(2):
        path = config(n)
        without_keyring_file(path)
        machine = data / f"machine-{n}"
        machine.mkdir()
        shutil.copy2(data / "master.key", machine / "master.key")
        path.write_text(path.read_text().replace('"master.key"', f'"machine-{n}/master.key"'))
        configs.append(path)
    checked = run_kmipd("check-config", configs[0])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    daemons = [Daemon("--config", c, log=tmp_path / f"d{n}.log") for n, c in enumerate(configs)]
    admin = {**creds, "cert": data / "pki" / "admin.pem", "key": data / "pki" / "admin-key.pem"}
    with Client(daemons[0].address, **creds) as a, Client(daemons[1].address, **creds) as b:
        with a.create_dek("orders") as dek:
            first_id, first = dek.dek_id, bytes(dek.key)
        with b.get_dek(first_id) as again:
            assert bytes(again.key) == first
        with Client(daemons[1].address, **admin) as b_admin:
            b_admin.rotate_kek("orders")
        with a.create_dek("orders") as dek:
            second_id, second = dek.dek_id, bytes(dek.key)
        with b.get_dek(second_id) as again:
            assert bytes(again.key) == second
        assert {d.dek_id: d.key_bytes() for d in a.get_deks([first_id, second_id])} == {
            first_id: first,
            second_id: second,
        }
    for daemon in daemons:
        assert daemon.stop() == 0
    assert not (data / "keyring.cbor").exists()  # nothing went to a file
    assert keyring_rows(postgres_db, "kek") == 2
    # A daemon given another master key: check-config says so, serve refuses to start.
    create_master_key(data / "machine-1" / "other.key")
    wrong = configs[1].read_text().replace("machine-1/master.key", "machine-1/other.key")
    configs[1].write_text(wrong)
    checked = run_kmipd("check-config", configs[1])
    assert checked.returncode != 0
    assert "is sealed under another master key" in checked.stdout + checked.stderr
    refused = run_kmipd("serve", "--config", configs[1])
    assert refused.returncode == 1
    assert "is sealed under another master key" in refused.stderr.strip().splitlines()[-1]
    assert keyring_rows(postgres_db, "kek") == 2


# -- PKCS#11: every daemon on one token (a network HSM) -------------------------------------


@pytest.mark.slow
def test_daemons_on_one_pkcs11_token_share_its_keks(
    softhsm: SoftToken, ca: CertificateAuthority, tmp_path: Path, postgres_db: str
) -> None:
    """Two daemon processes, each with its own sessions and login, on one SoftHSM2
    token (standing for a network HSM both machines reach) and one PostgreSQL."""
    configs = []
    for n in range(2):
        machine = tmp_path / f"machine-{n}"
        machine.mkdir()
        path = write_config(machine / "kmipd.toml", ca, softhsm, sessions=2)
        text = path.read_text().replace(
            f'path = "{machine / "kmipd.db"}"',
            f'backend = "postgresql"\nconninfo = "{postgres_db}"',
        )
        text += f'[[grant]]\nidentity = "spiffe://{TRUST_DOMAIN}/admin"\n'
        text += 'namespaces = ["*"]\noperations = ["admin"]\n'
        path.write_text(text)
        configs.append(path)
    daemons = [Daemon("--config", c, log=c.parent / "serve.log") for c in configs]
    storage, admin = credentials(ca, "storage"), credentials(ca, "admin")
    with Client(daemons[0].address, **storage) as a, Client(daemons[1].address, **storage) as b:
        with Client(daemons[0].address, **admin) as a_admin:
            a_admin.create_kek("orders")  # made on the token through a
        with a.create_dek("orders") as dek:
            first_id, first = dek.dek_id, bytes(dek.key)
        with b.get_dek(first_id) as again:
            assert bytes(again.key) == first
        with Client(daemons[1].address, **admin) as b_admin:
            b_admin.rotate_kek("orders")  # v2 is made on the token through b
        with a.create_dek("orders") as dek:
            second_id, second = dek.dek_id, bytes(dek.key)
            assert dek.kek_version == 2
        with b.get_dek(second_id) as again:
            assert bytes(again.key) == second
        assert a.status().hsm == b.status().hsm == "pkcs11: ok"
    for daemon in daemons:
        assert daemon.stop() == 0
    assert count(postgres_db, "SELECT count(*) FROM kek_versions") == 2
    assert keyring_rows(postgres_db, "kek") == 0  # the keys are the token's, not the store's
