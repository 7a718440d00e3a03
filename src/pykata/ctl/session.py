"""Running commands against a connected agent: API calls, built-ins, output."""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import re
import shlex
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from .. import otlp
from ..api import agent_pb2
from ..ttrpc import Client, Code, TtrpcError
from .api import METHODS, CommandError, Method, build_request, describe
from .autovalues import AutoValues, new_id
from .tracing import ClientTracing

log = logging.getLogger("pykata.ctl")

BUILTINS = {
    "echo": "echo WORDS...         print the words",
    "help": "help [NAME]           list commands, or show the fields of NAME's request",
    "list": "list                  list the agent API commands",
    "repeat": "repeat N COMMAND...  run COMMAND N times",
    "sleep": "sleep DURATION        wait: 2, 1.5s, 250ms",
    "quit": "quit                  stop (also: exit, Ctrl-D)",
    "run": "run COMMAND [ARGS...]  create a container from --bundle-dir running COMMAND, "
    "start it, stream its output, wait, print the exit code, remove it",
}


class Quit(Exception):
    """The `quit` built-in."""


@dataclass
class Outcome:
    command: str
    code: Code
    message: str = ""
    response: dict[str, Any] | None = None


def split(line: str) -> list[str]:
    """Shell-like words, except that `NAME json://...` keeps the JSON verbatim."""
    head, _, rest = line.strip().partition(" ")
    if rest.lstrip().startswith("json://"):
        return [head, rest.strip()]
    return shlex.split(line)


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
        out: TextIO = sys.stdout,
        tracing: ClientTracing | None = None,
    ) -> None:
        self.client = client
        self.auto = auto
        self.output = output
        self.timeout = timeout
        self.out = out
        self.failures = 0
        #: --trace: a span per command line (the client's interceptor makes the calls').
        self.tracing = tracing

    # --- one line ------------------------------------------------------------------

    async def execute(self, line: str) -> bool:
        """Run one command line; False if it failed (the failure is printed)."""
        try:
            words = split(line)
        except ValueError as exc:
            return self._report(Outcome(line, Code.INVALID_ARGUMENT, f"cannot parse: {exc}"))
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
            return self._report(await self.call(method, args))
        except CommandError as exc:
            return self._report(Outcome(name, Code.INVALID_ARGUMENT, str(exc)))

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, [*METHODS, *BUILTINS], n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; 'list' shows them all"
        return f"unknown command {name!r}{hint}"

    async def call(
        self, method: Method, args: list[str], request: Message | None = None
    ) -> Outcome:
        """Call `method` with a request built from `args` (plus auto values), or `request` as is."""
        if request is None:
            request = build_request(method, args)
            if self.auto is not None:
                self.auto.fill(method, request)
        log.debug(
            "calling",
            extra={
                "call": f"{method.service}/{method.name}",
                "request": json_format.MessageToDict(request),
            },
        )
        return await self._call(method, request)

    async def _call(self, method: Method, request: Message) -> Outcome:
        try:
            response = await self.client.call(
                method.service,
                method.name,
                request,
                method.response_type,
                timeout=self.timeout,
            )
        except TtrpcError as exc:
            return Outcome(method.name, exc.code, exc.message)
        return Outcome(method.name, Code.OK, response=_as_dict(response))

    # --- output ----------------------------------------------------------------------

    def _report(self, outcome: Outcome) -> bool:
        ok = outcome.code == Code.OK
        if not ok:
            self.failures += 1
        if self.output == "json":
            line: dict[str, Any] = {"command": outcome.command, "status": outcome.code.name}
            if ok:
                line["response"] = outcome.response or {}
            else:
                line["message"] = outcome.message
            print(json.dumps(line), file=self.out, flush=True)
            return ok
        if not ok:
            print(
                f"{outcome.command}: {outcome.code.name}: {outcome.message}",
                file=self.out,
                flush=True,
            )
            return False
        response = outcome.response or {}
        if outcome.command in ("ReadStdout", "ReadStderr") and "data" in response:
            print(response["data"], end="", file=self.out, flush=True)
            return True
        body = json.dumps(response, indent=2) if response else "{}"
        print(f"{outcome.command}: OK {body}", file=self.out, flush=True)
        return True

    def say(self, text: str) -> None:
        if self.output == "json":
            print(
                json.dumps({"command": "echo", "status": "OK", "response": {"text": text}}),
                file=self.out,
                flush=True,
            )
        else:
            print(text, file=self.out, flush=True)

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
                ok = await self.execute(shlex.join(args[1:])) and ok
            return ok
        elif name == "run":
            return await self.run(args)
        return True

    def overview(self) -> str:
        lines = ["Agent API commands (help NAME shows a request's fields):", ""]
        lines += [f"  {name}" for name in sorted(METHODS)]
        lines += ["", "Built-in commands:", ""] + [f"  {text}" for text in BUILTINS.values()]
        lines += ["", "Syntax: NAME [field=value ...] | NAME json://{...} | NAME file:///x.json"]
        return "\n".join(lines)

    def help(self, name: str) -> str:
        if name in BUILTINS:
            return BUILTINS[name]
        method = METHODS.get(name)
        if method is None:
            raise CommandError(self._unknown(name))
        descriptor = method.request_type.DESCRIPTOR
        lines = [f"{name}: {descriptor.full_name} -> {method.response_type.DESCRIPTOR.full_name}"]
        lines += _fields(descriptor, "  ", depth=2) or ["  (no fields)"]
        return "\n".join(lines)

    async def run(self, args: list[str]) -> bool:
        spec = self.auto.base_spec() if self.auto is not None else None
        if self.auto is None or spec is None:
            raise CommandError("run needs --bundle-dir (a bundle or a rootfs directory)")
        if not args:
            raise CommandError("run needs a command: run /bin/echo hello")
        del spec.Process.Args[:]
        spec.Process.Args.extend(args)
        spec.Process.Terminal = False  # output goes to stdout and stderr, separately
        cid = new_id()
        create = agent_pb2.CreateContainerRequest(
            container_id=cid, exec_id=cid, OCI=spec, storages=self.auto.storages()
        )
        outcome = await self.call(METHODS["CreateContainer"], [], create)
        if outcome.code != Code.OK:
            return self._report(outcome)
        self.auto.container_id, self.auto.exec_id = cid, ""
        outcome = await self.call(METHODS["StartContainer"], [])
        if outcome.code != Code.OK:
            return self._report(outcome)
        cid = self.auto.container_id
        await asyncio.gather(
            self._stream(cid, "ReadStdout", sys.stdout), self._stream(cid, "ReadStderr", sys.stderr)
        )
        waited = await self.call(METHODS["WaitProcess"], [])
        removed = await self.call(METHODS["RemoveContainer"], [])
        if waited.code != Code.OK:
            return self._report(waited)
        status = (waited.response or {}).get("status", 0)
        if self.output == "json":
            self._report(
                Outcome("run", Code.OK, response={"container_id": cid, "exit_code": status})
            )
        else:
            print(f"exit code {status}", file=self.out, flush=True)
        return removed.code == Code.OK or self._report(removed)

    async def _stream(self, cid: str, method: str, sink: TextIO) -> None:
        while True:
            outcome = await self.call(METHODS[method], [f"container_id={cid}", "len=65536"])
            data = (outcome.response or {}).get("data", "")
            if outcome.code != Code.OK or not data:
                return  # the end of the stream (empty data), or the container is gone
            if self.output == "json":
                self._report(Outcome(method, Code.OK, response={"data": data}))
            else:
                sink.write(data)
                sink.flush()


def _as_dict(message: Message) -> dict[str, Any]:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # Process output is text for people; bytes fields are otherwise base64.
    if isinstance(message, agent_pb2.ReadStreamResponse):
        data["data"] = message.data.decode(errors="replace")
    return data


def _fields(descriptor: Any, indent: str, depth: int) -> list[str]:
    lines = []
    for field in descriptor.fields:
        lines.append(f"{indent}{field.name}: {describe(field)}")
        if (
            field.message_type is not None
            and depth > 1
            and not field.message_type.GetOptions().map_entry
        ):
            lines += _fields(field.message_type, indent + "    ", depth - 1)
    return lines
