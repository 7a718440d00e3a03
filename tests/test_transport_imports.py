"""Transports know no protocol: pykata.transport imports only itself and the standard library.

A serial port still needs to tell one client from the next, which only the
protocol can; its user hands that in (the ttRPC server passes its
ClientBoundaries), so the transport never imports it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pykata.transport

PACKAGE = Path(pykata.transport.__file__).parent


def outside_imports(path: Path) -> list[str]:
    """What `path` imports from outside pykata.transport and the standard library,
    wherever the import stands (inside functions and TYPE_CHECKING blocks too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                continue  # a sibling module of the package
            if node.level > 1:
                found.append(f"line {node.lineno}: {'.' * node.level}{node.module or ''}")
                continue
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            inside = name == "pykata.transport" or name.startswith("pykata.transport.")
            if not inside and top not in sys.stdlib_module_names:
                found.append(f"line {node.lineno}: {name}")
    return found


def test_no_module_of_the_package_imports_a_protocol_or_anything_else() -> None:
    modules = sorted(PACKAGE.glob("*.py"))
    assert {m.name for m in modules} >= {"__init__.py", "unix.py", "vsock.py", "serial.py"}
    offenders = {m.name: found for m in modules if (found := outside_imports(m))}
    assert offenders == {}


def test_a_protocol_import_is_caught(tmp_path: Path) -> None:
    # The check above must be able to fail: each way of naming ttRPC is seen.
    module = tmp_path / "m.py"
    module.write_text(
        "import os\n"
        "from . import unix\n"
        "from ..ttrpc.frame import HEADER\n"
        "def f():\n"
        "    import pykata.ttrpc\n"
        "    from google.protobuf import message\n"
    )
    assert outside_imports(module) == [
        "line 3: ..ttrpc.frame",
        "line 5: pykata.ttrpc",
        "line 6: google.protobuf",
    ]


def test_importing_every_transport_loads_no_other_pykata_module() -> None:
    probe = (
        "import sys, pykata.transport\n"
        "import pykata.transport.hvsock, pykata.transport.serial\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    ours = {m for m in loaded if m.startswith("pykata.")}
    assert ours and all(m.startswith("pykata.transport") for m in ours), ours
    assert not [m for m in loaded if m.startswith(("google", "grpc", "opentelemetry"))]
