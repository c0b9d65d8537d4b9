"""The README, docs/, PROTOCOL.md and the CDDL say what the code does."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from kmipd.cli._main import _build_parser
from kmipd.client import ERROR_CLASSES
from kmipd.daemon.config import SCHEMA
from kmipd.protocol import OPERATIONS, ErrorCode

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
#: The README first, then the manuals by reader: a fact may live in any of them.
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS = "\n".join(path.read_text() for path in DOC_FILES)
PROTOCOL = (ROOT / "conformance" / "PROTOCOL.md").read_text()
CDDL = (ROOT / "conformance" / "protocol.cddl").read_text()


def test_every_config_option_is_documented() -> None:
    for section, options in SCHEMA.items():
        for key in options:
            assert f"`{section}.{key}`" in DOCS, f"{section}.{key} missing from the docs"


def test_every_error_code_is_documented_with_its_number() -> None:
    for code in ErrorCode:
        assert re.search(rf"\b{code.wire_name}: {int(code)},", CDDL), code
        assert re.search(rf"\| {int(code)} \| `{code.wire_name}`", PROTOCOL), code
        assert re.search(rf"\| {int(code)} \| `{code.wire_name}`", DOCS), code


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


def documented_commands() -> list[tuple[str, str]]:
    """Every ``kmipd ...`` line of a code block in the docs, as (file, argument line).

    Synopses are read the usual way: ``[--opt X]`` is taken as given, ``a|b``
    as its first choice, ``N`` as a number, ``...`` as nothing, ``A | kmipd B`` as two commands.
    """
    found = []
    for path in DOC_FILES:
        for line in path.read_text().splitlines():
            match = re.match(r"^ {4}(?:\.venv/bin/|/opt/kmipd/bin/)?kmipd (.*)$", line)
            if match is None:
                continue
            text = re.split(r"\s+# ", match.group(1))[0]
            text = re.sub(r"\$\([^)]*\)", "X", text)  # $(date +%F) in a file name
            text = text.replace("...connection options...", "").replace("...", "")
            text = re.sub(r"[\[\]]", "", text)
            text = re.sub(r"(\S+?)\|\S*", r"\1", text.replace(" | kmipd ", "\n"))
            text = re.sub(r" N\b", " 1", text)  # a number
            found.extend((path.name, command) for command in text.split("\n"))
    return found


@pytest.mark.parametrize(("document", "command"), documented_commands())
def test_every_documented_command_is_one_kmipd_accepts(document: str, command: str) -> None:
    try:
        _build_parser().parse_args(shlex.split(command))
    except SystemExit as exc:
        raise AssertionError(f"{document}: kmipd {command}: not accepted") from exc
