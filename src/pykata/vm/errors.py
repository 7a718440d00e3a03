"""The one error the VM launcher raises: its message says what went wrong and why."""

from __future__ import annotations


class VmError(RuntimeError):
    """The VM could not be started or did not come up; the message says why."""
