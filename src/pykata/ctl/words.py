"""Splitting a command line into words, as a POSIX shell quotes (no expansion).

    'single quotes'   every character as it is
    "double quotes"   a backslash escapes only  \\  "  $  `  and a newline
    $'ANSI-C'         bash's C escapes: \\n \\t \\r \\e \\a \\b \\f \\v \\\\ \\' \\"
                      \\xHH and \\NNN (octal)
    outside quotes    a backslash makes the next character literal

Nothing is expanded ($VAR, globs, ~): the shell that started the tool has
done that already. `NAME json://...` keeps the rest of the line verbatim.
"""

from __future__ import annotations

import re

__all__ = ["WordError", "c_escapes", "split"]


class WordError(ValueError):
    """A line that cannot be split (an unterminated quote); the message says where."""


_C_ESCAPES = {
    "n": "\n", "t": "\t", "r": "\r", "e": "\x1b", "E": "\x1b", "a": "\a", "b": "\b",
    "f": "\f", "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?",
}  # fmt: skip
_C_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|.)", re.DOTALL)


def c_escapes(text: str) -> str:
    """C-style escapes replaced (as bash's $'...' and printf do); others left as they are.

    A byte escape of 0x80 or more stands for that byte, not a character: it is
    kept as Python's surrogateescape does, so `.encode(errors="surrogateescape")`
    gives the byte back (and a string field refuses it as invalid UTF-8).
    """

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code[0] == "x" and len(code) > 1:
            return _byte(int(code[1:], 16))
        if code[0] in "01234567":
            return _byte(int(code, 8) & 0xFF)
        return _C_ESCAPES.get(code, match.group(0))

    return _C_ESCAPE.sub(one, text)


def _byte(value: int) -> str:
    return chr(value) if value < 0x80 else chr(0xDC00 + value)


def split(line: str) -> list[str]:
    """The words of `line`. Raises WordError for an unterminated quote."""
    head, _, rest = line.strip().partition(" ")
    if rest.lstrip().startswith("json://"):
        return [head, rest.strip()]
    words: list[str] = []
    word: list[str] | None = None  # None: between words
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in " \t\n":
            if word is not None:
                words.append("".join(word))
                word = None
            i += 1
            continue
        if word is None:
            word = []
        if c == "\\":
            if i + 1 < n and line[i + 1] != "\n":
                word.append(line[i + 1])
            i += 2
        elif c == "'":
            end = line.find("'", i + 1)
            if end < 0:
                raise WordError(f"no closing ' for the quote at column {i + 1}")
            word.append(line[i + 1 : end])
            i = end + 1
        elif c == '"':
            i = _double_quoted(line, i, word)
        elif c == "$" and line.startswith("$'", i):
            i = _ansi_c_quoted(line, i, word)
        else:
            word.append(c)
            i += 1
    if word is not None:
        words.append("".join(word))
    return words


def _double_quoted(line: str, start: int, word: list[str]) -> int:
    i = start + 1
    while i < len(line):
        c = line[i]
        if c == '"':
            return i + 1
        if c == "\\" and i + 1 < len(line) and line[i + 1] in '\\"$`\n':
            if line[i + 1] != "\n":
                word.append(line[i + 1])
            i += 2
            continue
        word.append(c)
        i += 1
    raise WordError(f'no closing " for the quote at column {start + 1}')


def _ansi_c_quoted(line: str, start: int, word: list[str]) -> int:
    i = start + 2
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            i += 2
            continue
        if line[i] == "'":
            word.append(c_escapes(line[start + 2 : i]))
            return i + 1
        i += 1
    raise WordError(f"no closing ' for the $' quote at column {start + 1}")
