"""``kmipd hsm ...``: the token side of an installation (software-init, init, rekey, list).

``hsm init`` runs with the daemon stopped (it takes the store's lock, as the
daemon does): it logs in to the token, creates a namespace's KEK version 1
through the same service code as the ``create-kek`` operation (so it is
audited like one, under a ``local:`` identity), then proves the new KEK
wraps and unwraps before printing its token object.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import secrets
from pathlib import Path
from typing import Any

import attrs
import trio

from kmipd.audit import AuditLog
from kmipd.cli._common import CliError, Commands
from kmipd.daemon import open_hsm, open_store
from kmipd.daemon._logging import configure_logging
from kmipd.daemon.config import Config, load_config
from kmipd.hsm import (
    HsmError,
    HsmIntegrityError,
    Pkcs11Hsm,
    create_master_key,
    read_master_key,
    reseal_entry,
)
from kmipd.protocol import CreateKek, KekInfo
from kmipd.service import Caller, Grant, KeyService, Policy, ServerInfo, ServiceError

_SELF_TEST_AAD = b"kmipd hsm init: self-test"


def register(commands: Commands) -> None:
    hsm = commands.add_parser("hsm", help="HSM backends").add_subparsers(metavar="ACTION")
    soft = hsm.add_parser("software-init", help="create the software backend's master key")
    soft.add_argument("--master-key", type=Path, required=True)
    soft.set_defaults(handler=_hsm_software_init)
    init = hsm.add_parser(
        "init",
        help="create a namespace's KEK (version 1) in the configured HSM; daemon stopped",
        description="Logs in to the HSM of the config, creates KEK NAME version 1 as the "
        "create-kek operation does (audited), checks that it wraps and unwraps, and prints "
        "it (PKCS#11: the token object and its attributes). Takes the store's lock: stop "
        "the daemon first.",
    )
    init.add_argument("--config", type=Path, required=True, help="the daemon's config file")
    init.add_argument("name", metavar="NAME", help="the namespace (KEK name)")
    init.set_defaults(handler=_hsm_init)
    rekey = hsm.add_parser(
        "rekey",
        help="seal the keyring in the PostgreSQL store under a new master key; daemons stopped",
        description="Creates NEW_MASTER_KEY (0600) and reseals every entry of the software "
        "HSM's keyring in the PostgreSQL store under it, in one transaction; refused while "
        "any daemon is connected. Then give every daemon the new key as hsm.master_key "
        "and destroy every copy of the old one: the WAL, replicas and backups made before "
        "hold the keyring sealed under the old key only, so KEKs destroyed before the "
        "rekey cannot come back from them.",
    )
    rekey.add_argument("--config", type=Path, required=True, help="the daemon's config file")
    rekey.add_argument("--new-master-key", type=Path, required=True, help="file to create")
    rekey.set_defaults(handler=_hsm_rekey)
    listing = hsm.add_parser(
        "list", help="kmipd's KEK objects on the PKCS#11 token and their attributes"
    )
    listing.add_argument("--config", type=Path, required=True, help="the daemon's config file")
    listing.set_defaults(handler=_hsm_list)


def _hsm_software_init(args: argparse.Namespace) -> int:
    create_master_key(args.master_key)
    print(f"created master key {args.master_key} (mode 0600); back it up somewhere safe")
    return 0


def _hsm_init(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging(config.log_level)
    try:
        result = trio.run(init_kek, config, args.name)
    except ServiceError as exc:
        raise CliError(f"{args.name}: {exc.message}") from None
    print(
        f"created KEK {result.kek.name!r} version {result.kek.version} "
        f"(HSM handle {result.handle}), audited as {result.identity}; wrap+unwrap verified"
    )
    if result.token_object is not None:
        print(json.dumps(result.token_object, indent=2))
    return 0


def _hsm_rekey(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not config.keyring_in_store or config.postgres is None or config.master_key is None:
        raise CliError(
            "hsm rekey works on the software keyring in the PostgreSQL store "
            "(store.backend = 'postgresql', hsm.backend = 'software', no hsm.keyring)"
        )
    from kmipd.store._postgres import reseal_keyring  # noqa: PLC0415 - psycopg on demand

    old = read_master_key(config.master_key)
    new_path: Path = args.new_master_key
    create_master_key(new_path)  # refuses a file that exists
    try:
        new = read_master_key(new_path)
        count = reseal_keyring(
            config.postgres.connection_string(),
            lambda kind, handle, sealed: reseal_entry(old, new, kind, handle, sealed),
        )
    except BaseException:
        new_path.unlink()  # nothing is sealed under it
        raise
    print(
        f"resealed {count} keyring entries under {new_path}. Now make it hsm.master_key on "
        f"every daemon, destroy every copy of {config.master_key}, then start the daemons."
    )
    return 0


def _hsm_list(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(json.dumps(trio.run(list_token_objects, config), indent=2))
    return 0


@attrs.frozen
class InitResult:
    kek: KekInfo
    handle: str
    identity: str
    #: The token object's attributes (PKCS#11), or None for the software backend.
    token_object: dict[str, Any] | None


def local_identity() -> str:
    """Who runs the command, as the audit trail names them (not a certificate identity)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"local:{user}"


async def init_kek(config: Config, name: str) -> InitResult:
    """Create KEK ``name`` version 1 in the configured HSM; raises ServiceError, HsmError,
    StoreError."""
    identity = local_identity()
    with contextlib.ExitStack() as resources:
        store = await open_store(config)
        resources.callback(store.close)
        hsm = await open_hsm(config, store)
        resources.callback(hsm.close)
        audit = AuditLog.open(config.audit_path, config.audit_key)
        resources.callback(audit.close)
        service = KeyService(
            store=store,
            hsm=hsm,
            # Only this: the command may create this one KEK, nothing else.
            policy=Policy((Grant(identity, (name,), frozenset({"create-kek"})),)),
            info=ServerInfo(name=config.server_name),
            lifecycle=config.lifecycle,
            audit=audit,
        )
        info = await service.handle(Caller(identity), CreateKek(name=name))
        kek = store.get_kek(name)
        assert kek is not None
        handle = kek.latest.hsm_handle
        probe = secrets.token_bytes(32)
        wrapped = await hsm.wrap(handle, probe, _SELF_TEST_AAD)
        try:
            ok = await hsm.unwrap(handle, wrapped, _SELF_TEST_AAD) == probe
        except HsmIntegrityError:
            ok = False
        if not ok:
            raise HsmError(f"the new KEK {handle} does not unwrap what it wrapped")
        token_object = None
        if isinstance(hsm, Pkcs11Hsm):
            token_object = next(
                (o for o in await hsm.list_objects() if o["handle"] == handle), None
            )
        return InitResult(info, handle, identity, token_object)


async def list_token_objects(config: Config) -> list[dict[str, Any]]:
    """kmipd's objects on the configured PKCS#11 token, with their attributes."""
    if config.pkcs11 is None:
        raise HsmError("hsm list needs hsm.backend = 'pkcs11' (the software keyring is a file)")
    hsm = await open_hsm(config)
    try:
        assert isinstance(hsm, Pkcs11Hsm)
        return await hsm.list_objects()
    finally:
        hsm.close()
