"""Help text for the command-line tools: every option says its default."""

from __future__ import annotations

import argparse


class Formatter(argparse.HelpFormatter):
    """A description or epilog of several lines is kept as written (examples keep their
    lines), one line is wrapped; an option whose help does not state its default gets
    `(default: X)`, or `(default: off)` for a flag."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default == argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return f"{text} (default: off)"
        if action.default is None or action.default == []:
            return text  # the help says what happens without it (checked by the tests)
        return f"{text} (default: %(default)s)"
