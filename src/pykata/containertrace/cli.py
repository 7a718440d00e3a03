"""kata-container-trace: record LTTng traces of container runs through the agent,
summarise them, and convert them for Perfetto.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from .. import __version__, traceview
from .. import log as logsetup
from ..clihelp import Formatter
from ..ttrpc import TtrpcError
from . import ctf, session
from .workload import Workload, record_workload

EPILOG = """\
examples:
  sudo kata-container-trace record                       # `ls /` once, in a container
  sudo kata-container-trace record --count 10 --command 'cat /etc/os-release'
  kata-container-trace summary lttng-traces/kata-20261123-101500
  kata-container-trace chrome lttng-traces/kata-20261123-101500 -o trace.json \\
      --spans spans.jsonl                                # merged with the agent's OTel spans

Open trace.json in https://ui.perfetto.dev or chrome://tracing; open the
recorded directory itself in Trace Compass (File > Open Trace).
"""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kata-container-trace",
        description="LTTng traces of container runs through the pykata agent.",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    top.add_argument("--version", action="version", version=f"kata-container-trace {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    record = sub.add_parser(
        "record",
        help="record a container run (root)",
        description="Run a container through a pykata agent while LTTng records it.",
        formatter_class=Formatter,
    )
    record.add_argument("--name", help="session and trace name (default: kata-<date>-<time>)")
    record.add_argument("--command", dest="run", default="ls /", help="what the container runs")
    record.add_argument("--count", type=int, default=1, help="how many times it runs it")
    record.add_argument("--runtime", default="auto", help="crun, runc, or auto")
    record.add_argument(
        "--output-dir",
        type=Path,
        default=Path("lttng-traces"),
        metavar="DIR",
        help="where the trace directory goes",
    )
    summary = sub.add_parser(
        "summary",
        help="events per type, process and container",
        description="Count a recorded trace's events per type, process and container.",
        formatter_class=Formatter,
    )
    summary.add_argument("trace", type=Path, help="a directory record wrote")
    chrome = sub.add_parser(
        "chrome",
        help="convert to the Chrome trace-event JSON format",
        description="Convert a recorded trace for Perfetto or chrome://tracing.",
        formatter_class=Formatter,
    )
    chrome.add_argument("trace", type=Path, help="a directory record wrote")
    chrome.add_argument(
        "-o", "--output", type=Path, required=True, help="the JSON file to write (required)"
    )
    chrome.add_argument(
        "--spans",
        type=Path,
        help="OTLP JSON lines (kata-trace-forwarder --output) to merge (default: the "
        "spans the recording kept, if any)",
    )
    return top


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the session's clean-up


def _give_to_invoker(path: Path) -> None:
    """The trace belongs to whoever ran sudo, not to root."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if uid is None or gid is None:
        return
    for item in [path, *path.rglob("*")]:
        os.chown(item, int(uid), int(gid), follow_symlinks=False)


def record(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("kata-container-trace: record runs containers: run it as root", file=sys.stderr)
        return 2
    if args.count < 1:
        print("kata-container-trace: --count must be at least 1", file=sys.stderr)
        return 2
    name = args.name or time.strftime("kata-%Y%m%d-%H%M%S")
    destination = args.output_dir / name
    if destination.exists():
        print(f"kata-container-trace: {destination} exists already", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupted)
    session.ensure_session_daemon()  # before the agent starts: its Python agent registers
    why_not = session.kernel_tracing()
    if why_not:
        print(f"kernel tracing unavailable ({why_not}): recording userspace only", file=sys.stderr)
    workload = Workload(command=args.run, count=args.count, runtime=args.runtime)
    with tempfile.TemporaryDirectory(prefix="kata-lttng-") as tmp:
        output = Path(tmp) / name
        recording = session.recording(name, output, kernel=why_not is None)
        spans = Path(tmp) / ctf.SPANS_FILE
        try:
            with session.Guard(name) as guard:
                status = record_workload(workload, recording, spans, guard)
        except KeyboardInterrupt:
            print(f"kata-container-trace: interrupted; session {name} destroyed", file=sys.stderr)
            return 130
        except (TtrpcError, RuntimeError) as exc:
            print(f"kata-container-trace: {exc}; session {name} destroyed", file=sys.stderr)
            return 1
        (output / ctf.CONTAINERS_FILE).write_text(json.dumps(workload.containers) + "\n")
        if spans.exists():
            shutil.copy(spans, output / ctf.SPANS_FILE)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(output, destination)
    _give_to_invoker(destination)
    for wrapper, why in workload.left_out.items():
        print(f"left out liblttng-ust-{wrapper}: {why}", file=sys.stderr)
    print(f"trace: {destination}  (container exit status {status})")
    print(ctf.summarise(destination).text(), end="")
    return 0


def chrome(args: argparse.Namespace) -> int:
    events = ctf.chrome(args.trace)
    spans_file = args.spans or args.trace / ctf.SPANS_FILE  # the recorder keeps them there
    if spans_file.exists():
        spans = traceview.read_spans(spans_file.read_text().splitlines())
        events += traceview.chrome_trace(spans)["traceEvents"]
        events.append(
            {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "agent spans"}}
        )
    args.output.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    print(f"{len(events)} events -> {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logsetup.setup(logsetup.LEVELS["warn"], name="kata-container-trace", source="containertrace")
    try:
        if args.command == "record":
            return record(args)
        _readable_trace(args)
        if args.command == "summary":
            print(ctf.summarise(args.trace).text(), end="")
            return 0
        return chrome(args)
    except (session.LttngError, traceview.ViewError) as exc:
        print(f"kata-container-trace: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # babeltrace2 found no trace it can read
        print(f"kata-container-trace: {args.trace}: no LTTng trace here ({exc})", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"kata-container-trace: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1


def _readable_trace(args: argparse.Namespace) -> None:
    """The paths a user gave exist, before babeltrace2 says otherwise in a traceback."""
    if not args.trace.is_dir():
        raise traceview.ViewError(f"{args.trace}: no such trace directory")
    spans = getattr(args, "spans", None)
    if spans is not None and not spans.is_file():
        raise traceview.ViewError(f"--spans {spans}: no such file")


if __name__ == "__main__":
    sys.exit(main())
