"""The README, PROTOCOL.md and the CDDL say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from kmipd.client import ERROR_CLASSES
from kmipd.daemon.config import SCHEMA
from kmipd.protocol import OPERATIONS, ErrorCode

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
PROTOCOL = (ROOT / "conformance" / "PROTOCOL.md").read_text()
CDDL = (ROOT / "conformance" / "protocol.cddl").read_text()


def test_every_config_option_is_documented() -> None:
    for section, options in SCHEMA.items():
        for key in options:
            assert f"`{section}.{key}`" in README, f"{section}.{key} missing from README"


def test_every_error_code_is_documented_with_its_number() -> None:
    for code in ErrorCode:
        assert re.search(rf"\b{code.wire_name}: {int(code)},", CDDL), code
        assert re.search(rf"\| {int(code)} \| `{code.wire_name}`", PROTOCOL), code
        assert re.search(rf"\| {int(code)} \| `{code.wire_name}`", README), code


def test_every_operation_is_in_the_schema_and_the_prose() -> None:
    for name in OPERATIONS:
        assert f'op: "{name}"' in CDDL, name
        assert f"| `{name}` |" in PROTOCOL, name


def test_readme_gives_the_two_setup_commands_that_ci_uses() -> None:
    assert "    bash .ci/setup && .venv/bin/kmipd demo\n" in README
    assert "    bash .ci/test\n" in README
    assert "bash .ci/test" in (ROOT / ".ci" / "run").read_text()


def test_every_error_code_has_a_client_exception() -> None:
    assert set(ERROR_CLASSES) == set(ErrorCode)
    for code, cls in ERROR_CLASSES.items():
        assert cls.__name__.lower().replace("error", "") == code.wire_name.replace("-", "") or (
            code is ErrorCode.TIMEOUT
        ), cls
