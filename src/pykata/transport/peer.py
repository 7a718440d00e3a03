"""Who is at the other end of a connection, as far as the socket can tell."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from . import unix, vsock


@dataclass(frozen=True)
class Peer:
    """A unix socket's process (SO_PEERCRED), or a vsock peer's CID and port."""

    pid: int | None = None
    uid: int | None = None
    cid: int | None = None
    port: int | None = None

    @property
    def key(self) -> tuple[str, int | None, int | None]:
        """The same for every connection of one peer process (or one VM)."""
        if self.cid is not None:
            return ("cid", self.cid, None)
        return ("process", self.uid, self.pid)

    def log_fields(self) -> dict[str, int]:
        names = {"peer_pid": self.pid, "peer_uid": self.uid}
        names.update(peer_cid=self.cid, peer_port=self.port)
        return {name: value for name, value in names.items() if value is not None}


def peer_of(transport: asyncio.BaseTransport) -> Peer:
    creds = unix.peer_credentials(transport)
    if creds is not None:
        return Peer(pid=creds[0], uid=creds[1])
    where = vsock.peer_address(transport)
    if where is not None:
        return Peer(cid=where[0], port=where[1])
    return Peer()
