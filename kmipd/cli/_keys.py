"""``kmipd dek|datakey|kek|status|key|job ...``: client calls about keys, and their lifecycle.

DEKs and KEK versions share their state commands (revoke, destroy, recover,
activate, attributes): one builder adds them to both groups, so the two
cannot drift apart.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from typing import Any

from kmipd.cli._client import client_call, client_options, connect, parse_context, to_json
from kmipd.cli._common import CliError, Commands, parse_timestamp
from kmipd.lifecycle import RevocationReason, State


def register(commands: Commands) -> None:
    common = client_options()
    dek, kek = _add_key_commands(commands, common)
    _add_lifecycle_commands(commands, dek, kek, common)


def _add_key_commands(
    commands: Commands, common: argparse.ArgumentParser
) -> tuple[Commands, Commands]:
    reveal = argparse.ArgumentParser(add_help=False)
    reveal.add_argument(
        "--reveal",
        action="store_true",
        help="print the key itself (hex); otherwise only its metadata",
    )

    dek = commands.add_parser("dek", help="stored DEKs").add_subparsers(metavar="ACTION")
    create = dek.add_parser("create", parents=[common, reveal], help="create a DEK")
    create.add_argument("--namespace", required=True)
    create.set_defaults(handler=client_call(lambda c, a: c.create_dek(a.namespace)))
    get = dek.add_parser("get", parents=[common, reveal], help="fetch a DEK by id")
    get.add_argument("dek_id", metavar="ID")
    get.set_defaults(handler=client_call(lambda c, a: c.get_dek(a.dek_id)))

    datakey = commands.add_parser("datakey", help="stateless data keys (caller keeps the blob)")
    actions = datakey.add_subparsers(metavar="ACTION")
    generate = actions.add_parser(
        "generate", parents=[common, reveal], help="new key + wrapped blob"
    )
    generate.add_argument("--kek", required=True)
    generate.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    generate.set_defaults(
        handler=client_call(lambda c, a: c.generate_data_key(a.kek, parse_context(a.context)))
    )
    unwrap = actions.add_parser("unwrap", parents=[common, reveal], help="recover a blob's key")
    unwrap.add_argument("blob", help="the blob, base64")
    unwrap.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    unwrap.set_defaults(
        handler=client_call(lambda c, a: c.unwrap(_parse_blob(a.blob), parse_context(a.context)))
    )

    kek = commands.add_parser("kek", help="KEK administration").add_subparsers(metavar="ACTION")
    kek_create = kek.add_parser("create", parents=[common], help="create a namespace's KEK")
    kek_create.add_argument("name")
    kek_create.add_argument(
        "--usage",
        action="append",
        choices=["wrap", "unwrap"],
        help="limit the KEK to one usage (repeatable; default both)",
    )
    kek_create.add_argument(
        "--activation",
        type=parse_timestamp,
        metavar="WHEN",
        help="activate later (ISO 8601 or epoch seconds): pre-active until",
    )
    kek_create.set_defaults(
        handler=client_call(
            lambda c, a: c.create_kek(a.name, usage=a.usage, activation=a.activation)
        )
    )
    kek_list = kek.add_parser("list", parents=[common], help="list KEKs")
    kek_list.add_argument("--prefix")
    kek_list.set_defaults(handler=client_call(lambda c, a: c.list_keks(a.prefix)))

    status = commands.add_parser("status", parents=[common], help="server health")
    status.set_defaults(handler=client_call(lambda c, a: c.status()))
    return dek, kek


def _key_ref(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "dek_id", None) is not None:
        return {"dek_id": args.dek_id}
    return {"kek": args.name, "version": args.version}


def _add_state_commands(group: Commands, target: str, common: argparse.ArgumentParser) -> None:
    """revoke, destroy, recover, activate, attributes for DEKs ("dek") or KEK versions."""

    def add(action: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(action, parents=[common], help=help_text)
        if target == "dek":
            parser.add_argument("dek_id", metavar="ID")
        else:
            parser.add_argument("name")
            parser.add_argument("--version", type=int, required=True)
        return parser

    revoke = add("revoke", "revoke: key-compromise compromises, other reasons deactivate")
    revoke.add_argument("--reason", required=True, choices=[r.value for r in RevocationReason])
    revoke.add_argument("--message")
    revoke.set_defaults(
        handler=client_call(lambda c, a: c.revoke(a.reason, message=a.message, **_key_ref(a)))
    )
    destroy = add("destroy", "destroy (recoverable during the soft-delete window)")
    destroy.add_argument(
        "--purge-now", action="store_true", help="erase the material now, beyond recovery"
    )
    if target == "kek":
        destroy.add_argument(
            "--force", action="store_true", help="even if DEKs still depend on it (they are lost)"
        )
    destroy.set_defaults(
        handler=client_call(
            lambda c, a: c.destroy(
                force=getattr(a, "force", False), purge_now=a.purge_now, **_key_ref(a)
            )
        )
    )
    add("recover", "undo a destroy within the soft-delete window").set_defaults(
        handler=client_call(lambda c, a: c.recover(**_key_ref(a)))
    )
    add("activate", "activate a pre-active key now").set_defaults(
        handler=client_call(lambda c, a: c.activate(**_key_ref(a)))
    )
    add("attributes", "state, dates, usage").set_defaults(
        handler=client_call(lambda c, a: c.get_attributes(**_key_ref(a)))
    )


def _add_lifecycle_commands(
    commands: Commands, dek: Commands, kek: Commands, common: argparse.ArgumentParser
) -> None:
    """Revoke, destroy, recover, activate, rotate, rewrap: for DEKs and KEK versions alike."""
    _add_state_commands(dek, "dek", common)
    _add_state_commands(kek, "kek", common)
    dek.add_parser(
        "rewrap", parents=[common], help="re-wrap under the newest KEK version"
    ).add_argument("dek_id", metavar="ID")
    dek.choices["rewrap"].set_defaults(handler=client_call(lambda c, a: c.rewrap_dek(a.dek_id)))
    rotate = kek.add_parser("rotate", parents=[common], help="make the KEK's next version")
    rotate.add_argument("name")
    rotate.set_defaults(handler=client_call(lambda c, a: c.rotate_kek(a.name)))
    dependents = kek.add_parser(
        "dependents", parents=[common], help="which DEKs depend on a KEK version"
    )
    dependents.add_argument("name")
    dependents.add_argument("--version", type=int, required=True)
    dependents.add_argument("--limit", type=int)
    dependents.set_defaults(
        handler=client_call(lambda c, a: c.dependents(a.name, a.version, limit=a.limit))
    )
    rewrap = kek.add_parser(
        "rewrap", parents=[common], help="rewrap every DEK of the namespace (background job)"
    )
    rewrap.add_argument("name")
    rewrap.add_argument("--wait", action="store_true", help="follow the job until it is done")
    rewrap.set_defaults(handler=_rewrap_namespace)

    key = commands.add_parser("key", help="find keys").add_subparsers(metavar="ACTION")
    locate = key.add_parser("list", parents=[common], help="KEK versions and DEKs")
    locate.add_argument("--kind", choices=["dek", "kek"])
    locate.add_argument("--namespace", help="a namespace or glob")
    locate.add_argument("--state", choices=[s.value for s in State])
    locate.add_argument("--after", help="continue after this DEK id (a previous next)")
    locate.add_argument("--limit", type=int)
    locate.set_defaults(
        handler=client_call(
            lambda c, a: c.locate(
                kind=a.kind, namespace=a.namespace, state=a.state, after=a.after, limit=a.limit
            )
        )
    )

    job = commands.add_parser("job", help="rewrap jobs").add_subparsers(metavar="ACTION")
    job_get = job.add_parser("get", parents=[common], help="a job's progress")
    job_get.add_argument("job_id", metavar="ID")
    job_get.set_defaults(handler=client_call(lambda c, a: c.get_job(a.job_id)))
    job_list = job.add_parser("list", parents=[common], help="jobs")
    job_list.add_argument("--state", choices=["running", "done", "failed"])
    job_list.set_defaults(handler=client_call(lambda c, a: c.list_jobs(a.state)))


def _rewrap_namespace(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.start_rewrap(args.name)
        print(json.dumps(to_json(job, reveal=False), indent=2), flush=True)
        while args.wait and job.state == "running":
            time.sleep(0.5)  # polling a long-running job's progress for a human
            job = client.get_job(job.job_id)
            print(
                f"{job.job_id}: {job.rewrapped} rewrapped, {job.remaining} remaining",
                file=sys.stderr,
                flush=True,
            )
    return 0 if job.state != "failed" else 1


def _parse_blob(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise CliError("the blob must be base64, as datakey generate prints it") from None
