"""Python modules Debian ships only for its own interpreter (python3-lttngust,
python3-bt2): pure bindings that also import into our CPython 3.11 once
Debian's dist-packages is on the path - appended, so our own packages keep
precedence."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

SYSTEM_PACKAGES = "/usr/lib/python3/dist-packages"


def import_module(name: str) -> ModuleType:
    """`name` from our own packages, else from Debian's; ImportError if neither has it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if SYSTEM_PACKAGES not in sys.path:
            sys.path.append(SYSTEM_PACKAGES)
        return importlib.import_module(name)
