"""The agent's orphan sweeper never steals the exit status of a helper it runs.

As PID 1 (or subreaper) the agent reaps zombies nobody waits for every few
seconds; a helper program (mount, swapon, modprobe ...) that exits just before
a sweep is one the event loop is about to collect. Reaped by the sweep, the
call waiting for it would wait forever: AddSwapPath once hung that way in the
guest. Real processes, on uvloop as in the agent.
"""

from __future__ import annotations

import asyncio
import time

import uvloop

from pykata.agent.command import run
from pykata.agent.reaper import orphans


def test_a_sweep_while_a_helper_exits_leaves_its_status_to_the_caller() -> None:
    async def main() -> tuple[bytes, list[int]]:
        helper = asyncio.ensure_future(run("sh", "-c", "echo done"))
        reaped: list[int] = []
        while not helper.done():
            # Sweep as the agent's sweeper does, holding the loop meanwhile, so the
            # helper exits between a sweep and the loop's own look at its children.
            for _ in range(20):
                time.sleep(0.002)
                reaped += orphans.sweep()
            await asyncio.wait({helper}, timeout=0)
            if len(reaped) > 0:
                break
        out = await asyncio.wait_for(helper, 10)
        return out, reaped

    out, reaped = uvloop.run(main())
    assert reaped == []
    assert out == b"done\n"
