"""kata-container-trace benchmark: what recording costs.

python bench/containertrace.py     # prints JSON results (needs root and LTTng)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pykata.containertrace import ctf  # noqa: E402

COUNT = 10
COMMAND = "ls /"


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pykata.containertrace.cli",
                "record",
                "--name",
                "bench",
                "--count",
                str(COUNT),
                "--command",
                COMMAND,
                "--output-dir",
                tmp,
            ],
            check=True,
            capture_output=True,
            cwd=tmp,
        )
        wall = time.perf_counter() - started
        trace = Path(tmp) / "bench"
        size = sum(f.stat().st_size for f in trace.rglob("*") if f.is_file())
        started = time.perf_counter()
        summary = ctf.summarise(trace)
        read_s = time.perf_counter() - started
    return {
        "count": COUNT,
        "command": COMMAND,
        "record_s": wall,
        "events": summary.count,
        "trace_mb": size / 1e6,
        "read_events_per_s": summary.count / read_s,
    }


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
