"""Ids from the wire: container, exec and sandbox ids.

Ids become file names (bundles, pid files, process specs) and cgroup
names, so every id is checked before it is used, whatever the call.
The rule is upstream's for container ids (kata-sys-util `verify_id`:
a letter or digit, then letters, digits, '.', '_' or '-', two characters
at least), applied here to every kind of id, with a length limit so an
id always fits in a file name.
"""

from __future__ import annotations

from .errors import InvalidId

#: Longest id accepted, in UTF-8 bytes (upstream has no limit; a file name
#: has 255 bytes at most, and ids get suffixes such as ".process.json").
MAX_ID_BYTES = 128
_PUNCTUATION = frozenset("._-")


def is_valid_id(value: str) -> bool:
    return (
        1 < len(value) <= MAX_ID_BYTES
        and value[0].isalnum()
        and all(c.isalnum() or c in _PUNCTUATION for c in value)
        and len(value.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES
    )


def check_id(kind: str, value: str, *, may_be_empty: bool = False) -> str:
    """`value` if it is a valid id; InvalidId naming `kind` otherwise.

    `may_be_empty`: an empty exec id names a container's init process.
    """
    if (may_be_empty and value == "") or is_valid_id(value):
        return value
    shown = value if len(value) <= 80 else f"{value[:80]}... ({len(value)} characters)"
    raise InvalidId(
        f"{kind} {shown!r} is not a valid id: use at least 2 letters, digits, '_', '.' "
        f"or '-' (at most {MAX_ID_BYTES} bytes), starting with a letter or digit"
    )
