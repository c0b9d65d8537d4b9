"""``kmipd serve``: run the daemon from a config file, or a self-contained dev server."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import trio

from kmipd.cli._common import Commands
from kmipd.daemon import run_daemon
from kmipd.daemon._dev import client_command, prepare_dev
from kmipd.daemon._logging import configure_logging
from kmipd.daemon._systemd import ServiceManager
from kmipd.daemon._workers import WorkerRole, WorkerSupervisor
from kmipd.daemon.config import load_config

DEFAULT_DEV_DIR = Path("kmipd-dev")
DEFAULT_DEV_LISTEN = "127.0.0.1:5696"


def register(commands: Commands) -> None:
    serve = commands.add_parser("serve", help="run the daemon")
    mode = serve.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", type=Path, help="TOML config file")
    mode.add_argument(
        "--dev",
        action="store_true",
        help="self-contained development server (test CA, software HSM)",
    )
    serve.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DEV_DIR,
        help="--dev: data directory (default ./kmipd-dev)",
    )
    serve.add_argument(
        "--listen",
        default=DEFAULT_DEV_LISTEN,
        help="--dev: HOST:PORT to listen on (default 127.0.0.1:5696)",
    )
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    config_path = prepare_dev(args.data, args.listen) if args.dev else args.config
    config = load_config(config_path)
    configure_logging(config.log_level)
    role = WorkerRole.from_environment()
    if role is not None:  # one of a supervisor's workers (see kmipd.daemon._workers)
        trio.run(
            functools.partial(
                run_daemon,
                role.configure(config),
                lambda _: role.announce_ready(),
                manager=role.manager(),
            )
        )
        return 0
    manager = ServiceManager.from_environment()

    def announce(addresses: list[str]) -> None:
        if args.dev:
            print(f"kmipd: dev data in {args.data}/ (config {config_path})")
            print("kmipd: try, in another shell:")
            print(f"  {client_command(args.data, addresses[0])} --reveal")
        # The last line, and the one to wait for: everything is ready.
        print(f"kmipd: listening on {', '.join(addresses)}", flush=True)

    if config.workers > 1:
        return trio.run(WorkerSupervisor(config, manager, announce).run)
    trio.run(
        functools.partial(
            run_daemon, config, lambda daemon: announce(daemon.addresses), manager=manager
        )
    )
    return 0
