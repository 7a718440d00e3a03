"""Interactive mode: line editing and history (readline), tab completion of
command names and of the request's field names."""

from __future__ import annotations

import contextlib
import os
import readline
from collections.abc import Callable
from pathlib import Path

from .api import METHODS
from .session import BUILTINS, Quit, Session

HISTORY = Path(os.environ.get("KATA_AGENT_CTL_HISTORY", "~/.kata-agent-ctl_history")).expanduser()
PROMPT = "kata-agent-ctl> "


def candidates(line: str, text: str) -> list[str]:
    """What may complete `text`, the word being typed at the end of `line`."""
    words = line.split()
    first_word = not words or (len(words) == 1 and not line.endswith(" "))
    if first_word:
        return sorted(n for n in [*METHODS, *BUILTINS, "exit"] if n.startswith(text))
    if words[0] == "help":  # help <TAB>: a command's name
        second_word = len(words) == 1 or (len(words) == 2 and not line.endswith(" "))
        return sorted(n for n in [*METHODS, *BUILTINS] if n.startswith(text)) if second_word else []
    if words[0] == "repeat" and len(words) >= 2:  # repeat N <TAB>: a command line
        rest = line.split(None, 2)[2] if len(words) > 2 or line.endswith(" ") else ""
        return candidates(rest, text) if len(words) > 2 or line.endswith(" ") else []
    method = METHODS.get(words[0])
    if method is None:
        return []
    descriptor = method.request_type.DESCRIPTOR
    *parents, stem = text.split(".")
    prefix = ""
    for parent in parents:  # walk nested messages: OCI.Process.Ar<TAB>
        field = descriptor.fields_by_name.get(parent.split("[")[0])
        if field is None or field.message_type is None:
            return []
        descriptor = field.message_type
        prefix += parent + "."
    out = []
    for field in descriptor.fields:
        if field.name.startswith(stem):
            nested = field.message_type is not None and not field.is_repeated
            out.append(prefix + field.name + ("." if nested else "="))
    return sorted(out)


def _completer(text: str, state: int) -> str | None:
    options = candidates(readline.get_line_buffer()[: readline.get_endidx()], text)
    return options[state] if state < len(options) else None


def setup_readline() -> None:
    readline.set_completer(_completer)
    readline.set_completer_delims(" \t\n")
    readline.parse_and_bind("tab: complete")
    with contextlib.suppress(OSError):
        readline.read_history_file(HISTORY)
    readline.set_history_length(1000)


def interact(session: Session, execute: Callable[[str], bool]) -> None:
    """Read-eval-print until quit or end of input; `execute` runs a line (Ctrl-C
    meanwhile interrupts that line, as the session says; at the prompt it clears it)."""
    setup_readline()
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            try:
                execute(line)
            except Quit:
                return
    finally:
        with contextlib.suppress(OSError):
            readline.write_history_file(HISTORY)
