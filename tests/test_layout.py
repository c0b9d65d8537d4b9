"""The import rules that keep the layers apart, checked on the source tree.

Data walks one way (bytes -> protocol -> server -> service -> store/hsm), and
what runs or operates the daemon sits above all of it. A forbidden import is
found by reading the modules' import statements (every one, also those inside
functions), so a rule broken "just for one helper" fails here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_ABOVE = ("kmipd.daemon", "kmipd.cli")
_IO = ("trio", "socket", "ssl", "selectors", "sqlite3", "subprocess", "threading")

#: (package whose modules are checked, imported prefixes it must never use, why)
RULES: list[tuple[str, tuple[str, ...], str]] = [
    (
        "kmipd.protocol",
        ("kmipd.", *_IO),
        "the protocol is sans-IO: it imports no I/O module and no other kmipd layer",
    ),
    (
        "kmipd.service",
        ("kmipd.server", "kmipd.client", *_ABOVE),
        "the service performs operations; it never learns about sockets or callers' shells",
    ),
    (
        "kmipd.store",
        ("kmipd.hsm", "kmipd.service", "kmipd.server", "kmipd.client", *_ABOVE),
        "the store keeps wrapped bytes and metadata; it never unwraps",
    ),
    (
        "kmipd.hsm",
        ("kmipd.store", "kmipd.service", "kmipd.server", "kmipd.client", *_ABOVE),
        "an HSM backend knows keys, not where their wrapped copies are kept",
    ),
    (
        "kmipd.server",
        ("kmipd.client", *_ABOVE),
        "the server is assembled by the daemon, never the reverse",
    ),
    (
        "kmipd.client",
        ("kmipd.server", "kmipd.service", "kmipd.store", "kmipd.hsm", *_ABOVE),
        "the client library ships to storage systems: it needs nothing of the daemon",
    ),
    (
        "kmipd.crypto",
        ("kmipd.server", "kmipd.client", "kmipd.service", "kmipd.store", "kmipd.hsm", *_ABOVE),
        "crypto helpers are leaves that every layer may use",
    ),
    ("kmipd.net", ("kmipd.server", "kmipd.client", "kmipd.service", *_ABOVE), "leaf"),
    ("kmipd.lifecycle", ("kmipd.",), "the lifecycle model is pure data and rules"),
    ("kmipd.audit", ("kmipd.service", "kmipd.server", *_ABOVE), "leaf"),
    ("kmipd.metrics", ("kmipd.server", "kmipd.service", *_ABOVE), "leaf"),
    ("pki", ("kmipd",), "pki is the CA's own package: kmipd imports it, never the reverse"),
    (
        "conformance",
        ("kmipd",),
        "the conformance suite is black-box: it talks to a server by its address only"
        " (it may use pki to make test certificates)",
    ),
]

#: Imports inside a package's own modules that a rule would otherwise catch.
ALLOWED_WITHIN = {
    "kmipd.protocol": ("kmipd.protocol",),
    "kmipd.lifecycle": ("kmipd.lifecycle",),
    # The suite may frame its messages with the protocol's own framing, nothing else.
    "conformance": ("kmipd.protocol._framing",),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, module: str) -> Iterator[tuple[int, list[str]]]:
    """Every import statement of a file: its line and the modules it may load."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield node.lineno, [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # ``from kmipd import server`` imports kmipd.server.
            yield node.lineno, [target, *(f"{target}.{alias.name}" for alias in node.names)]


def _matches(name: str, prefix: str) -> bool:
    if prefix.endswith("."):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path, rules: list[tuple[str, tuple[str, ...], str]]) -> list[str]:
    found = []
    for package, forbidden, why in rules:
        package_dir = root.joinpath(*package.split("."))
        for path in sorted(package_dir.rglob("*.py")):
            module = module_name(path, root)
            allowed = ALLOWED_WITHIN.get(package, ())
            for line, names in imported_modules(path, module):
                bad = [
                    name
                    for name in names
                    if not any(_matches(name, prefix) for prefix in allowed)
                    and any(_matches(name, prefix) for prefix in forbidden)
                ]
                if bad:
                    found.append(f"{path.relative_to(root)}:{line}: imports {bad[0]} ({why})")
    return sorted(set(found))


def test_the_layers_import_only_downwards() -> None:
    assert violations(ROOT, RULES) == []


@pytest.mark.parametrize(
    ("package", "module_text"),
    [
        ("kmipd/protocol", "import trio\n"),
        ("kmipd/protocol", "def f():\n    from kmipd.server import KmipServer\n"),
        ("kmipd/service", "from kmipd import server\n"),
        ("kmipd/store", "from kmipd.hsm import HsmBackend\n"),
        ("kmipd/store", "from ..hsm import HsmBackend\n"),
        ("pki", "import kmipd.client\n"),
        ("conformance", "from kmipd.service import KeyService\n"),
        ("kmipd/client", "from kmipd.daemon.config import Config\n"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path: Path, package: str, module_text: str) -> None:
    """The checker itself: the same rules over a tree with one bad import added."""
    directory = tmp_path.joinpath(*package.split("/"))
    directory.mkdir(parents=True)
    for parent in [directory, *directory.parents]:
        if parent == tmp_path:
            break
        parent.joinpath("__init__.py").touch()
    directory.joinpath("_bad.py").write_text(module_text)
    found = violations(tmp_path, [rule for rule in RULES if rule[0] == package.replace("/", ".")])
    assert len(found) == 1
    assert found[0].startswith(f"{package}/_bad.py:")


def test_every_package_says_what_it_is() -> None:
    """The tree with each package's one-line docstring is the architecture's map."""
    for init in sorted((ROOT / "kmipd").rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(ROOT)} has no docstring"


def test_no_loose_modules_at_the_top() -> None:
    loose = sorted(p.name for p in (ROOT / "kmipd").glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"]
