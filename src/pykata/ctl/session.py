"""Running commands against a connected agent: API calls, built-ins, output."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import logging
import os
import re
import shlex
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, BinaryIO

from google.protobuf import json_format
from google.protobuf.message import Message

from .. import otlp
from ..api import agent_pb2
from ..ttrpc import Client, Code, TtrpcError
from . import run as run_mod
from .api import METHODS, CommandError, Method, build, describe
from .autovalues import AutoValues
from .tracing import ClientTracing
from .words import WordError, split

log = logging.getLogger("pykata.ctl")

#: name: (syntax, what it does)
BUILTINS = {
    "run": (
        run_mod.USAGE,
        "a container from --bundle-dir, as docker run --rm: its output, then it is "
        "removed and its exit status is the tool's; -i: stdin, -t: a terminal",
    ),
    "echo": ("echo WORDS...", "print the words"),
    "help": ("help [NAME]", "list the commands, or the fields of NAME's request"),
    "list": ("list", "the agent API commands, one a line"),
    "repeat": ("repeat N COMMAND...", "run COMMAND N times"),
    "sleep": ("sleep DURATION", "wait: 2, 1.5s, 250ms"),
    "quit": ("quit", "stop (also: exit, Ctrl-D)"),
}


def builtins_table(width: int = 79) -> list[str]:
    """The built-ins in two aligned columns, the second wrapped within `width`."""
    left = max(len(syntax) for syntax, _ in BUILTINS.values())
    lines = []
    for syntax, what in BUILTINS.values():
        wrapped = textwrap.wrap(what, max(20, width - left - 4))
        lines.append(f"  {syntax:<{left}}  {wrapped[0]}")
        lines += [f"  {'':<{left}}  {more}" for more in wrapped[1:]]
    return lines


SYNTAX = """\
Syntax: NAME [field=value ...] | NAME json://{...} | NAME file:///request.json
  nested fields with dots (OCI.Process.Cwd=/tmp), repeated ones by repeating
  (process.Args=/bin/ls process.Args=-l) or as a JSON list, elements as
  storages[0].driver=local, map entries as OCI.Annotations[key]=value, a whole
  message as JSON (OCI.Linux.Resources='{"Memory": {"Limit": 1000000}}').
  Quoting as in a POSIX shell ('...', "...", \\, and bash's $'...' for escapes);
  bytes fields take printf's escapes (data='hi\\n') or hex:68690a; signals by
  name (signal=KILL, SIGTERM, usr1)."""

#: Responses that are a text for people: printed as the text in text mode.
TEXT_RESPONSES = {"GetMetrics": "metrics", "GetIPTables": "data", "SetIPTables": "data"}
STREAM_READS = ("ReadStdout", "ReadStderr")


class Quit(Exception):
    """The `quit` built-in."""


@dataclass
class Outcome:
    command: str
    code: Code
    message: str = ""
    reply: Message | None = None
    #: a response of our own (run, echo) instead of an agent's
    response: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.response is not None:
            return self.response
        return {} if self.reply is None else _as_dict(self.reply)


def _duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text)
    if not match:
        raise CommandError(f"sleep: {text!r} is not a duration (2, 1.5s, 250ms)")
    scale = {"ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * scale


class Session:
    def __init__(
        self,
        client: Client,
        auto: AutoValues | None,
        *,
        output: str = "text",
        timeout: float | None = None,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
        stdin_free: bool = True,
        tracing: ClientTracing | None = None,
    ) -> None:
        self.client = client
        self.auto = auto
        self.output = output
        self.timeout = timeout
        self.stdout = stdout if stdout is not None else sys.stdout.buffer
        self.stderr = stderr if stderr is not None else sys.stderr.buffer
        #: Commands do not come from stdin: `run` may take it for its process.
        self.stdin_free = stdin_free
        self.failures = 0
        #: The exit status the tool ends with: the last failure's (1, or a run's status).
        self.status = 0
        #: The first SIGINT/SIGTERM of the command being run, if any.
        self.interrupted: int | None = None
        #: Our stdout was closed by its reader (`| head`).
        self.output_closed = False
        self._last_byte: dict[str, bytes] = {}
        self._task: asyncio.Task[Any] | None = None
        self._run: run_mod.Run | None = None
        #: --trace: a span per command line (the client's interceptor makes the calls').
        self.tracing = tracing

    # --- one line ------------------------------------------------------------------

    async def execute(self, line: str) -> bool:
        """Run one command line; False if it failed (the failure is reported)."""
        self.interrupted = None
        self._task = asyncio.current_task()
        try:
            return await self._traced(line)
        except asyncio.CancelledError:
            if self.interrupted is None:
                raise
            self._failed(128 + self.interrupted)
            return False
        finally:
            self._task = None

    def interrupt(self, signum: int) -> None:
        """SIGINT or SIGTERM while a command runs: `run` passes it to its process,
        anything else is abandoned."""
        if self.interrupted is None:
            self.interrupted = signum
        if self._run is not None:
            self._run.interrupt(signum)
        elif self._task is not None:
            self._task.cancel()

    async def _traced(self, line: str) -> bool:
        try:
            words = split(line)
        except WordError as exc:
            return self.report(Outcome(line, Code.INVALID_ARGUMENT, f"cannot parse: {exc}"))
        if not words:
            return True
        if self.tracing is None:
            return await self._execute(words)
        with self.tracing.command(words[0], line) as span:
            ok = await self._execute(words)
            if not ok:
                span.status, span.status_message = otlp.STATUS_ERROR, "the command failed"
            return ok

    async def _execute(self, words: list[str]) -> bool:
        name, args = words[0], words[1:]
        try:
            if name in ("quit", "exit"):
                raise Quit
            if name in BUILTINS:
                return await self._builtin(name, args)
            method = METHODS.get(name)
            if method is None:
                raise CommandError(self._unknown(name))
            return self.report(await self.call(method, args))
        except CommandError as exc:
            return self.report(Outcome(name, Code.INVALID_ARGUMENT, str(exc)))

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, [*METHODS, *BUILTINS], n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; 'list' shows them all"
        return f"unknown command {name!r}{hint}"

    async def call(
        self, method: Method, args: list[str], request: Message | None = None
    ) -> Outcome:
        """Call `method` with a request built from `args` (plus auto values), or `request` as is."""
        if request is None:
            request, given = build(method, args)
            if self.auto is not None:
                self.auto.fill(method, request, frozenset(given))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "calling",
                extra={
                    "call": f"{method.service}/{method.name}",
                    "request": json_format.MessageToDict(request, preserving_proto_field_name=True),
                },
            )
        try:
            response = await self.client.call(
                method.service, method.name, request, method.response_type, timeout=self.timeout
            )
        except TtrpcError as exc:
            return Outcome(method.name, exc.code, exc.message)
        return Outcome(method.name, Code.OK, reply=response)

    # --- output ----------------------------------------------------------------------

    def _failed(self, status: int) -> None:
        self.failures += 1
        self.status = status

    def report(self, outcome: Outcome) -> bool:
        ok = outcome.code == Code.OK
        if not ok:
            self._failed(1)
        if self.output == "json":
            line: dict[str, Any] = {"command": outcome.command, "status": outcome.code.name}
            if ok:
                line["response"] = outcome.as_dict()
            else:
                line["message"] = outcome.message
            self.print(json.dumps(line))
            return ok
        if not ok:
            self.print(f"{outcome.command}: {outcome.code.name}: {outcome.message}")
            return False
        reply = outcome.reply
        if outcome.command in STREAM_READS and isinstance(reply, agent_pb2.ReadStreamResponse):
            self._write("stdout", reply.data)  # the bytes as they are; nothing at the end
            return True
        text_field = TEXT_RESPONSES.get(outcome.command)
        if text_field is not None and reply is not None:
            text = getattr(reply, text_field)
            self._write("stdout", text if isinstance(text, bytes) else text.encode())
            return True
        response = outcome.as_dict()
        body = json.dumps(response, indent=2) if response else "{}"
        self.print(f"{outcome.command}: OK {body}")
        return True

    def print(self, text: str) -> None:
        """A line of ours on stdout."""
        self._write("stdout", text.encode() + b"\n")

    def note(self, text: str, *, after_interrupt: bool = False) -> None:
        """A line for the person at the terminal, on stderr. After an interrupt, the
        terminal has echoed ^C: the note starts a line of its own, and so does the next."""
        start = b"\n" if after_interrupt and os.isatty(2) else b""
        self._write("stderr", start + f"kata-agent-ctl: {text}".encode() + b"\n")
        if after_interrupt and start:
            self._last_byte["any"] = self._last_byte["stderr"] = b"C"

    def say(self, text: str) -> None:
        if self.output == "json":
            self.print(json.dumps({"command": "echo", "status": "OK", "response": {"text": text}}))
        else:
            self.print(text)

    def write_stream(self, stream: str, data: bytes, method: str) -> bool:
        """A process's output: the bytes to our `stream`, or a JSON line. False once our
        stdout's reader has gone."""
        if self.output == "json":
            response = _as_dict(agent_pb2.ReadStreamResponse(data=data))
            self.print(json.dumps({"command": method, "status": "OK", "response": response}))
        else:
            self._write(stream, data)
        return not self.output_closed

    def _write(self, stream: str, data: bytes) -> None:
        if not data or (stream == "stdout" and self.output_closed):
            return
        sink = self.stdout if stream == "stdout" else self.stderr
        try:
            sink.write(data)
            sink.flush()
        except BrokenPipeError:
            if stream == "stdout":
                self.output_closed = True
            return
        self._last_byte[stream] = data[-1:]
        self._last_byte["any"] = data[-1:]

    def trailer(self, text: str, *, shared: bool) -> None:
        """A last line on stderr on a line of its own, even after output with no newline
        at its end (`shared`: stdout and stderr are the same terminal or file)."""
        last = self._last_byte.get("any" if shared else "stderr", b"\n")
        self._write("stderr", (b"" if last == b"\n" else b"\n") + text.encode() + b"\n")

    # --- built-ins -----------------------------------------------------------------

    async def _builtin(self, name: str, args: list[str]) -> bool:
        if name == "echo":
            self.say(" ".join(args))
        elif name == "list":
            self.say("\n".join(sorted(METHODS)))
        elif name == "help":
            self.say(self.help(args[0]) if args else self.overview())
        elif name == "sleep":
            if len(args) != 1:
                raise CommandError("sleep takes one duration: sleep 1s")
            await asyncio.sleep(_duration(args[0]))
        elif name == "repeat":
            if not args or not args[0].isdigit():
                raise CommandError("repeat takes a count and a command: repeat 3 Check")
            ok = True
            for _ in range(int(args[0])):
                ok = await self._traced(shlex.join(args[1:])) and ok
            return ok
        elif name == "run":
            return await self.run(args)
        return True

    def overview(self) -> str:
        lines = ["Agent API commands (help NAME shows a request's fields):", ""]
        lines += _columns(sorted(METHODS), 78)
        lines += ["", "Built-in commands:", "", *builtins_table()]
        return "\n".join([*lines, "", SYNTAX])

    def help(self, name: str) -> str:
        if name in BUILTINS:
            syntax, what = BUILTINS[name]
            return f"{syntax}\n  {what}"
        method = METHODS.get(name)
        if method is None:
            raise CommandError(self._unknown(name))
        descriptor = method.request_type.DESCRIPTOR
        lines = [f"{name}: {descriptor.full_name} -> {method.response_type.DESCRIPTOR.full_name}"]
        rows = _fields(descriptor, "  ", depth=2)
        width = max((len(left) for left, _ in rows), default=0)
        lines += [f"{left:<{width}}  {right}" for left, right in rows] or ["  (no fields)"]
        return "\n".join(lines)

    async def run(self, args: list[str]) -> bool:
        runner = self._run = run_mod.Run(self, run_mod.parse(args))
        try:
            status = await runner.execute()
        finally:
            self._run = None
        if status is None:
            return False  # reported
        if self.output == "json":
            response = {"container_id": runner.cid, "exit_code": status}
            self.report(Outcome("run", Code.OK, response=response))
        else:
            self.trailer(f"exit code {status}", shared=_same_output())
        if status != 0:
            self._failed(status)
            return False
        return True


def _same_output() -> bool:
    """stdout and stderr are the same terminal or file (2>&1)."""
    try:
        return os.path.samestat(os.fstat(1), os.fstat(2))
    except OSError:
        return False


def _columns(names: list[str], width: int) -> list[str]:
    column = max(len(n) for n in names) + 2
    per_line = max(1, (width - 2) // column)
    rows = (len(names) + per_line - 1) // per_line
    lines = []
    for r in range(rows):
        row = [names[c * rows + r] for c in range(per_line) if c * rows + r < len(names)]
        lines.append("  " + "".join(f"{n:<{column}}" for n in row).rstrip())
    return lines


def _as_dict(message: Message) -> dict[str, Any]:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    if isinstance(message, agent_pb2.ReadStreamResponse):
        # `data` stays base64 (the bytes exactly); `text` too when they are UTF-8
        with contextlib.suppress(UnicodeDecodeError):
            data["text"] = message.data.decode()
    return data


def _fields(descriptor: Any, indent: str, depth: int) -> list[tuple[str, str]]:
    rows = []
    for field in descriptor.fields:
        rows.append((f"{indent}{field.name}", describe(field)))
        if (
            field.message_type is not None
            and depth > 1
            and not field.message_type.GetOptions().map_entry
        ):
            rows += _fields(field.message_type, indent + "    ", depth - 1)
    return rows
