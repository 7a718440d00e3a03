"""No import runs up a layer: docs/architecture.md's table of layers, checked
against every import of every module (inside functions and TYPE_CHECKING
blocks too)."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pykata

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(pykata.__file__).parent
DOC = ROOT / "docs" / "architecture.md"


@dataclass(frozen=True)
class Layer:
    name: str
    rank: int  # 0 is the top
    never: tuple[str, ...]


def layer_table(text: str) -> dict[str, Layer]:
    """Module name -> its layer, from the table under '## The layers'."""
    section = text.split("## The layers", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    placed: dict[str, Layer] = {}
    for rank, row in enumerate(rows):
        name, modules, never = (cell.strip() for cell in row.strip("|").split("|"))
        layer = Layer(name, rank, tuple(re.findall(r"`([\w.]+)`", never)))
        for module in re.findall(r"`([\w.]+)`", modules):
            placed[module] = layer
    return placed


def layer_of(module: str, table: dict[str, Layer]) -> Layer | None:
    """The layer of the longest table name that is `module` or contains it (the top
    package contains nothing here: a new module of it must be placed)."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if (found := table.get(".".join(parts[:n]))) is not None:
            return found
    return table.get(module)


def inside(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".")


def module_name(path: Path, package_dir: Path) -> str:
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package_dir: Path) -> list[tuple[int, str]]:
    """(line, module) for every pykata module `path` imports."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x` names a module when x is one
                as_module = f"{target}.{alias.name}"
                is_module = _module_path(as_module, package_dir) is not None
                found.append((node.lineno, as_module if is_module else target))
    return [(line, m) for line, m in found if inside(m, package_dir.name)]


def _module_path(module: str, package_dir: Path) -> Path | None:
    relative = Path(*module.split(".")[1:])
    for candidate in (package_dir / relative.with_suffix(".py"), package_dir / relative):
        if candidate.exists():
            return candidate
    return None


def violations(package_dir: Path, table: dict[str, Layer]) -> list[str]:
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        if path.name.endswith("_pb2.py"):
            continue
        source = module_name(path, package_dir)
        mine = layer_of(source, table)
        if mine is None:
            found.append(f"{source}: in no layer (place it in docs/architecture.md)")
            continue
        for line, target in imports_of(path, package_dir):
            theirs = layer_of(target, table)
            if theirs is None:
                continue  # reported where that module is the source
            if theirs.rank < mine.rank:
                found.append(
                    f"{source}:{line} ({mine.name}) imports {target}, a layer up ({theirs.name})"
                )
            elif any(inside(target, banned) for banned in mine.never):
                found.append(f"{source}:{line} ({mine.name}) imports {target}, which it never may")
    return found


def test_every_module_has_a_layer_and_no_import_runs_up() -> None:
    table = layer_table(DOC.read_text())
    assert len({layer.name for layer in table.values()}) >= 6
    assert violations(PACKAGE, table) == []


def test_an_import_up_a_layer_is_caught(tmp_path: Path) -> None:
    # The check must be able to fail: a domain module that imports the service, one that
    # imports protobuf messages, and a module nobody placed.
    pkg = tmp_path / "pykata"
    (pkg / "agent").mkdir(parents=True)
    (pkg / "api").mkdir()
    for init in (pkg / "__init__.py", pkg / "agent" / "__init__.py", pkg / "api" / "__init__.py"):
        init.write_text("")
    (pkg / "api" / "agent_pb2.py").write_text("")
    (pkg / "agent" / "service.py").write_text("from .sandbox import Sandbox\n")
    (pkg / "agent" / "sandbox.py").write_text(
        "def f():\n    from . import service\n    from ..api import agent_pb2\n"
    )
    (pkg / "stray.py").write_text("")
    table = layer_table(DOC.read_text())
    found = violations(pkg, table)
    assert any("pykata.agent.sandbox:2 (domain) imports pykata.agent.service" in f for f in found)
    assert any(
        "sandbox:3 (domain) imports pykata.api.agent_pb2, which it never" in f for f in found
    )
    assert "pykata.stray: in no layer (place it in docs/architecture.md)" in found
    assert not any("pykata.agent.service:" in f for f in found)  # downward is fine
