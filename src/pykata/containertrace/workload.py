"""The traced workload: our agent, stand-alone, running a container that runs
a command N times - its processes preloaded with LTTng's wrapper libraries.

The container's root is the host's /usr (bind-mounted read-only), so its
programs are dynamically linked and the wrappers load; the session
daemon's socket directory and /dev/shm are shared so they reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..api import agent_pb2
from ..children import die_with_parent
from ..ocispec import default_config, to_spec
from ..ttrpc import Client, Stub
from .session import Guard

LIBDIR = "/usr/lib/x86_64-linux-gnu"
#: Wrappers worth preloading, in order; fork first (it keeps tracing across fork).
WRAPPERS = ("fork", "fd", "dl", "pthread-wrapper", "libc-wrapper")
LTTNG_RUN_DIR = "/var/run/lttng"
PROBE_SECONDS = 2
AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]


@dataclass
class Workload:
    command: str = "ls /"
    count: int = 1
    runtime: str = "auto"
    #: Container id -> PID namespace inode (ties events to containers).
    containers: dict[str, int] = field(default_factory=dict)
    #: Wrappers left out, and why.
    left_out: dict[str, str] = field(default_factory=dict)


def wrapper_path(name: str) -> str:
    return f"{LIBDIR}/liblttng-ust-{name}.so.1"


def _rootfs(path: Path) -> Path:
    """A root of mount points and merged-/usr links; the spec binds the host's /usr."""
    for d in ("usr", "proc", "dev", "sys", "tmp", "etc", "var/run/lttng"):
        (path / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink(f"/{link}"):
            (path / link).symlink_to(os.readlink(f"/{link}"))
    return path


def _spec(rootfs: Path, script: str, preload: list[str]) -> Any:
    config = default_config(str(rootfs.resolve()), ["/bin/sh", "-c", script])
    config["root"]["readonly"] = True
    config["process"]["env"] = [
        "PATH=/usr/bin:/bin:/usr/sbin:/sbin",
        f"LD_PRELOAD={':'.join(preload)}",
        "LTTNG_HOME=/var/run/lttng",
    ]
    mounts = [m for m in config["mounts"] if m["destination"] != "/dev/shm"]
    for source, options in (
        ("/usr", ["rbind", "ro"]),
        ("/dev/shm", ["rbind", "rw"]),
        (LTTNG_RUN_DIR, ["rbind", "rw"]),
    ):
        mounts.append({"destination": source, "type": "bind", "source": source, "options": options})
    config["mounts"] = mounts
    return to_spec(config)


@contextlib.contextmanager
def _process(
    command: list[str], work: Path, log_name: str, env: dict[str, str], guard: Guard
) -> Iterator[subprocess.Popen[bytes]]:
    """A helper process for the run: dies with us, stopped gracefully at the end."""
    with open(work / log_name, "wb") as log_file:
        proc = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stderr=log_file,
            cwd=work,  # `-m` puts the working directory on sys.path: ours, not the caller's
            preexec_fn=die_with_parent(
                signal.SIGTERM
            ),  # a killed recorder takes it (and the containers)
        )
    guard.watch(proc.pid)  # PDEATHSIG does not survive the forwarder's drop to nobody
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(path: Path, what: str, log_file: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            last = log_file.read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"{what} did not start: {last[0] if last else 'no output'}")
        time.sleep(0.02)


@contextlib.contextmanager
def agent_process(work: Path, runtime: str, spans: Path, guard: Guard) -> Iterator[str]:
    """Our agent, stand-alone: log records to LTTng too, spans through a forwarder to `spans`."""
    (work / "cmdline").write_text("")
    forwarder = [sys.executable, "-m", "pykata.forwarder.cli", "-l", "warn"]
    with _process(
        [*forwarder, "--listen", f"unix://{work}/trace.sock", "--output", str(spans)],
        work,
        "forwarder.log",
        {},
        guard,
    ) as fwd:
        _wait_for(work / "trace.sock", "kata-trace-forwarder", work / "forwarder.log", fwd)
        address = f"unix://{work}/agent.sock"
        env = {
            "KATA_AGENT_SERVER_ADDR": address,
            "KATA_AGENT_RUN_DIR": str(work / "run"),
            "KATA_AGENT_OCI_RUNTIME": runtime,
            "KATA_AGENT_LOG_LEVEL": "debug",
            "KATA_AGENT_LTTNG": "true",
            "KATA_AGENT_TRACING": "true",
            "KATA_AGENT_TRACE_ADDR": f"unix://{work}/trace.sock",
        }
        agent = [sys.executable, "-m", "pykata.agent.cli", "--kernel-cmdline", f"{work}/cmdline"]
        with _process(agent, work, "agent.log", env, guard) as proc:
            _wait_for(work / "agent.sock", "the agent", work / "agent.log", proc)
            yield address


async def _run(
    api: Any, cid: str, rootfs: Path, script: str, preload: list[str]
) -> tuple[int, int]:
    """Run one container to its end: (exit status, its PID namespace's inode)."""
    await api.CreateContainer(
        agent_pb2.CreateContainerRequest(container_id=cid, OCI=_spec(rootfs, script, preload))
    )
    try:
        # Created, not started: its init already sits in the container's namespaces.
        report = await api.GetDiagnosticData(
            agent_pb2.GetDiagnosticDataRequest(log_type="container", container_id=cid)
        )
        pid = json.loads(report.data)["state"]["pid"]
        pid_ns = os.stat(f"/proc/{pid}/ns/pid").st_ino
        await api.StartContainer(agent_pb2.StartContainerRequest(container_id=cid))
        status = (await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id=cid))).status
    finally:
        await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid))
    return status, pid_ns


async def probe_wrappers(workload: Workload, api: Any, rootfs: Path) -> list[str]:
    """The wrappers the command survives: each is tried alone in a container first,
    for up to PROBE_SECONDS (a long command that lasts that long with a wrapper
    as without it counts as surviving)."""
    probe = f"timeout {PROBE_SECONDS} sh -c {shlex.quote(workload.command)}"
    baseline, _ = await _run(api, "probe-none", rootfs, probe, [])
    preload = []
    for name in WRAPPERS:
        path = wrapper_path(name)
        if not os.path.exists(path):
            workload.left_out[name] = f"{path} is not installed"
            continue
        status, _ = await _run(api, f"probe-{name}", rootfs, probe, [path])
        if status != baseline:
            workload.left_out[name] = f"the command exits {status} with it, {baseline} without"
            continue
        preload.append(path)
    return preload  # the caller reports what was left out


async def run(
    workload: Workload, address: str, rootfs: Path, recording: AbstractContextManager[None]
) -> int:
    """Probe the wrappers, then - recording - run the container; its exit status."""
    async with await Client.connect(address) as client:
        api = Stub(client, AGENT)
        preload = await probe_wrappers(workload, api, rootfs)
        script = f"for i in $(seq {workload.count}); do {workload.command}; done"
        cid = f"traced-{os.getpid()}"
        with recording:
            status, pid_ns = await _run(api, cid, rootfs, script, preload)
        workload.containers[cid] = pid_ns
        return status


def record_workload(
    workload: Workload, recording: AbstractContextManager[None], spans: Path, guard: Guard
) -> int:
    """Run the workload, recording; the agent's spans go to `spans` (OTLP JSON lines)."""
    with tempfile.TemporaryDirectory(prefix="kata-container-trace-") as tmp:
        work = Path(tmp)
        rootfs = _rootfs(work / "rootfs")
        with agent_process(work, workload.runtime, spans, guard) as address:
            return asyncio.run(run(workload, address, rootfs, recording))
