"""Guest-side RPC benchmarks: CopyFile throughput, GetMetrics, the network RPCs,
and what a policy costs a call.

    python bench/guest.py      # prints JSON results
"""

from __future__ import annotations

import json
import os
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.peers import wait_for_socket  # noqa: E402

from pykata.api import agent_pb2, health_pb2  # noqa: E402
from pykata.ttrpc import Client, Stub  # noqa: E402

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
COPY_BYTES = 64 << 20
CHUNK = 1 << 20  # the runtime's chunk size for CopyFile
CALLS = 50
CHECKS = 3000
#: A policy of ten rules that do not match Check, so every one is tried.
POLICY = "\n".join(
    f'[[rules]]\nname = "r{n}"\nmethods = ["ExecProcess", "StartContainer"]\ndecision = "deny"\n'
    f'unless = {{ "container_id" = ["c{n}*"] }}\n'
    for n in range(10)
)


async def _median_ms(call: Callable[[], Awaitable[Any]], count: int = CALLS) -> float:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


async def _guest(address: str, shared: Path) -> dict[str, float]:
    async with await Client.connect(address) as client:
        api = Stub(client, AGENT)
        data = os.urandom(CHUNK)
        started = time.perf_counter()
        for offset in range(0, COPY_BYTES, CHUNK):
            await api.CopyFile(
                agent_pb2.CopyFileRequest(
                    path=str(shared / "containers" / "big.bin"),  # CopyFile's scope, as upstream
                    file_size=COPY_BYTES,
                    file_mode=stat.S_IFREG | 0o644,
                    offset=offset,
                    data=data,
                )
            )
        copy_mib_s = COPY_BYTES / (time.perf_counter() - started) / (1 << 20)
        assert (shared / "containers" / "big.bin").stat().st_size == COPY_BYTES
        metrics_ms = await _median_ms(lambda: api.GetMetrics(agent_pb2.GetMetricsRequest()))
        await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="bench"))
        interfaces_ms = await _median_ms(
            lambda: api.ListInterfaces(agent_pb2.ListInterfacesRequest())
        )
        routes_ms = await _median_ms(lambda: api.ListRoutes(agent_pb2.ListRoutesRequest()))
    return {
        "copyfile_mib_s": copy_mib_s,
        "getmetrics_ms": metrics_ms,
        "listinterfaces_ms": interfaces_ms,
        "listroutes_ms": routes_ms,
    }


async def _check_us(address: str) -> float:
    async with await Client.connect(address) as client:
        request = health_pb2.CheckRequest()

        async def check() -> None:
            await client.call("grpc.Health", "Check", request, health_pb2.HealthCheckResponse)

        return await _median_ms(check, CHECKS) * 1e3


def agent(tmp: str, *, policy: str | None = None) -> subprocess.Popen[bytes]:
    (Path(tmp) / "cmdline").write_text("")
    env = {
        **os.environ,
        "KATA_AGENT_SERVER_ADDR": f"unix://{tmp}/agent.sock",
        "KATA_AGENT_RUN_DIR": f"{tmp}/run",
        "KATA_AGENT_LOG_LEVEL": "warn",
    }
    if policy is not None:
        (Path(tmp) / "policy.toml").write_text(policy)
        env["KATA_AGENT_POLICY_FILE"] = f"{tmp}/policy.toml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykata.agent.cli", "--kernel-cmdline", f"{tmp}/cmdline"], env=env
    )
    wait_for_socket(f"{tmp}/agent.sock", proc=proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def measure() -> dict[str, Any]:
    import uvloop

    with tempfile.TemporaryDirectory() as tmp:
        proc = agent(tmp)
        try:
            results = uvloop.run(_guest(f"unix://{tmp}/agent.sock", Path(tmp) / "run/shared"))
        finally:
            stop(proc)
        checks: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):  # alternating, so a slow spell hits both alike
            for with_policy in (False, True):
                proc = agent(tmp, policy=POLICY if with_policy else None)
                try:
                    checks[with_policy].append(uvloop.run(_check_us(f"unix://{tmp}/agent.sock")))
                finally:
                    stop(proc)
    results["check_us_no_policy"] = statistics.median(checks[False])
    results["check_us_policy"] = statistics.median(checks[True])
    results["check_policy_ratio_per_round"] = [
        on / off for off, on in zip(checks[False], checks[True], strict=True)
    ]
    return results


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
