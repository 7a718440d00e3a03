"""The Kata runtime's own sequence of calls for a pod, replayed against the agent.

tests/go/kataruntime sends what the Kata runtime and its containerd shim send
for a Kubernetes pod with one container, an exec and a terminal exec, in
their order (upstream's runtime with shared_fs=none: files reach the guest by
CopyFile): Check, CreateSandbox with an ephemeral shm storage,
GetGuestDetails, the pause container, GetOOMEvent pending meanwhile, CopyFile
of the container's hosts, hostname, resolv.conf, termination log and a volume,
CreateContainer with the spec as the runtime leaves it, StartContainer, the
shim's stdio copies (ReadStdout/ReadStderr with 32 KiB until the end of the
stream, WriteStdin in 32 KiB chunks, CloseStdin), StatsContainer, the execs
with their resizes (one before the exec starts, with an empty exec id),
WaitProcess, and the stop sequences of container and pod down to
DestroySandbox and the disconnect. It is a typed Go client generated at test
time from our protos (protoc-gen-go, protoc-gen-go-ttrpc) on containerd's Go
ttRPC, as the runtime's is.

Every answer is checked: its code against docs/api.md's table (OK unless a row
says otherwise), outputs byte for byte, exit statuses, and what the container
sees (PID 1, the pod's hostname, the copied files, the volume, the sandbox's
shm). Run over unix and over hybrid vsock. Nothing is mocked but the VMM
(FakeVmm: no VSOCK peer can exist here, docs/api.md); the agent is a real
process running real crun containers from a busybox rootfs.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import os
import secrets
import signal
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from pykata import ocispec
from pykata.api import agent_pb2, health_pb2, oci_pb2
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import AgentProcess
from .containers import build_rootfs, leftovers, template
from .peers import FakeVmm, build_runtime_client, processes_with
from .test_upstream_codes import documented_rows

POD_NAME = "web-7d4b9c"
SHM_SIZE = 64 << 20
PAYLOAD = 3 * 32768 + 1000  # the container's stdin: four WriteStdin calls
EXEC_PAYLOAD = 32768 + 7232
STOP_MARKER = "== waiting for SIGTERM ==\n"
INIT = f"""trap 'echo terminated; echo -n "bye from $(hostname)" >/dev/termination-log; exit 3' TERM
echo "pid=$$"
echo "hostname=$(hostname)"
echo "etc-hostname=$(cat /etc/hostname)"
echo "data=$(sha256sum /data/latest)"
echo "shm=$(stat -c %a /dev/shm) $(df -k /dev/shm | awk 'NR==2 {{print $2}}')"
echo hosts:; cat /etc/hosts
echo resolv:; cat /etc/resolv.conf
echo stdin:; cat; echo "stdin closed"
echo "init stderr" >&2
printf '{STOP_MARKER}'
sleep 1000000 & wait
"""
EXEC = """echo "ppid=$PPID init=$(cat /proc/1/comm) hostname=$(hostname)"
[ $$ != 1 ] && echo "not pid 1"
cat; echo "exec stderr" >&2; exit 7
"""
TTY = 'read a; echo "a=$a $(stty size)"; read b; echo "b=$b $(stty size)"; exit 5'
HOSTS = (
    "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n10.244.1.7\tweb-7d4b9c\n"
)
RESOLV = (
    "search default.svc.cluster.local svc.cluster.local cluster.local\n"
    "nameserver 10.96.0.10\noptions ndots:5\n"
)

# (actor, method, n-th such call of the actor) -> the documented case it is
WAIT_AGAIN = ("WaitProcess", "status already collected")
DOCUMENTED_CASES = {
    ("tty", "TtyWinResize", 0): ("TtyWinResize", "no terminal"),  # empty exec id: the init
    ("app", "WaitProcess", 1): WAIT_AGAIN,  # container.go stop() waits again
    ("pause", "WaitProcess", 1): WAIT_AGAIN,
}


@pytest.fixture(params=["unix", "hybrid-vsock"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.go
async def test_the_runtimes_sequence_for_a_pod(
    transport: str, container_agent: AgentProcess, tmp_path: Path
) -> None:
    agent = container_agent  # its default OCI runtime: crun
    binary = build_runtime_client()
    run_dir = tmp_path / "run"
    pod = Pod(tmp_path, run_dir)
    assert agent.socket_path
    if transport == "unix":
        lines = await replay(binary, f"unix://{agent.socket_path}", pod.file)
    else:
        vmm = FakeVmm(tmp_path / "vmm.sock", {1024: agent.socket_path})
        async with vmm:
            lines = await replay(binary, f"hvsock://{vmm.path}:1024", pod.file)
        # the runtime's connection and the monitor's, each by the handshake
        assert vmm.connects == ["CONNECT 1024\n"] * 2
        assert [line["handshake"] for line in lines if line["actor"] == "vmm"] == [
            "OK 1073741824\n"
        ] * 2

    calls = by_actor(lines)
    check_codes(calls)
    check_sandbox(calls, pod)
    check_container(calls, pod, streams(lines, "app"))
    check_exec(calls, pod, streams(lines, "exec"))
    check_terminal_exec(calls, streams(lines, "tty"))
    check_stop(calls, pod)

    # Nothing is left of the pod, and the agent still serves.
    assert leftovers(pod.sandbox_id, run_dir) == []
    assert processes_with(pod.sandbox_id) == []
    assert processes_with(POD_NAME) == []  # the sandbox's namespace holder
    mountinfo = Path(f"/proc/{agent.proc.pid}/mountinfo").read_text()
    assert str(run_dir) not in mountinfo
    async with await Client.connect(agent.address) as client:
        health = await client.call(
            "grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


class Pod:
    """What the kubelet and containerd prepared on the host for the runtime."""

    def __init__(self, tmp: Path, run_dir: Path) -> None:
        self.sandbox_id = secrets.token_hex(32)
        self.app_id = secrets.token_hex(32)
        self.uid = str(uuid.uuid4())
        self.shared = run_dir / "shared" / "containers"
        host = tmp / "host"
        host.mkdir()
        self.hosts = write(host / "etc-hosts", HOSTS.encode())
        self.hostname = write(host / "hostname", f"{POD_NAME}\n".encode())
        self.resolv = write(host / "resolv.conf", RESOLV.encode())
        self.termination_log = write(host / "termination-log", b"")
        self.volume = host / "volume"
        self.volume.mkdir()
        # 2.5 MiB: three CopyFile chunks
        self.blob = write(self.volume / "blob", os.urandom(5 << 19))
        (self.volume / "latest").symlink_to("blob")
        self.stdin = write(host / "stdin", os.urandom(PAYLOAD))
        self.exec_stdin = write(host / "exec-stdin", os.urandom(EXEC_PAYLOAD))
        pause_spec = self.spec(tmp, "pause", ["/bin/sleep", "1000000"], sandbox=True)
        app_spec = self.spec(tmp, "app", ["/bin/sh", "-c", INIT], sandbox=False)
        self.file = tmp / "pod.json"
        self.file.write_text(
            json.dumps(
                {
                    "sandbox_id": self.sandbox_id,
                    "hostname": POD_NAME,
                    "resolv_conf": str(self.resolv),
                    "shm_size": SHM_SIZE,
                    "guest_shared_dir": str(self.shared),
                    "guest_sandbox_dir": str(run_dir / "sandbox"),
                    "pause": {"id": self.sandbox_id, "spec": str(pause_spec)},
                    "app": {
                        "id": self.app_id,
                        "spec": str(app_spec),
                        "stdin": str(self.stdin),
                        "stop_after": STOP_MARKER,
                    },
                    "exec": {"args": ["/bin/sh", "-c", EXEC], "stdin": str(self.exec_stdin)},
                    "tty": {
                        "args": ["/bin/sh", "-c", TTY],
                        "lines": ["one\n", "two\n"],
                        "sizes": [[40, 120], [50, 132]],
                    },
                }
            )
        )

    def spec(self, tmp: Path, name: str, args: list[str], *, sandbox: bool) -> Path:
        """The container's spec as containerd's CRI plugin hands it to the runtime."""
        config = template()
        config["root"] = {"path": str(build_rootfs(tmp / name / "rootfs")), "readonly": False}
        config["process"].update(
            args=args,
            terminal=False,
            env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 f"HOSTNAME={POD_NAME}"],
        )  # fmt: skip
        cid = self.sandbox_id if sandbox else self.app_id
        linux = config["linux"]
        linux["cgroupsPath"] = f"/kubepods/besteffort/pod{self.uid}/{cid}"
        linux["resources"].update(cpu={"shares": 2, "cpus": "0-1"}, pids={"limit": 1024})
        annotations = {
            "io.kubernetes.cri.container-type": "sandbox" if sandbox else "container",
            "io.kubernetes.cri.sandbox-id": self.sandbox_id,
            "io.kubernetes.cri.sandbox-name": POD_NAME,
            "io.kubernetes.cri.sandbox-namespace": "default",
            "io.kubernetes.cri.sandbox-uid": self.uid,
        }
        # containerd's shm for the pod: the runtime swaps it for the sandbox's storage
        shm = {
            "destination": "/dev/shm",
            "type": "bind",
            "source": f"/run/containerd/io.containerd.grpc.v1.cri/sandboxes/{self.sandbox_id}/shm",
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
        }
        mounts = [m for m in config["mounts"] if m["destination"] != "/dev/shm"] + [shm]
        if sandbox:
            config["hostname"] = POD_NAME
        else:
            config.pop("hostname", None)
            # The pod's namespaces by path (the pause container's): the runtime
            # drops them or empties the paths. None of these paths exists here.
            for ns in linux["namespaces"]:
                if ns["type"] == "network":
                    ns["path"] = f"/var/run/netns/cni-{self.uid}"
                elif ns["type"] in ("ipc", "uts"):
                    ns["path"] = f"/proc/4194305/ns/{ns['type']}"  # above any pid_max
            annotations.update(
                {
                    "io.kubernetes.cri.container-name": "app",
                    "io.kubernetes.cri.image-name": "docker.io/library/busybox:1.35",
                    "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
                    "io.kubernetes.container.terminationMessagePolicy": "File",
                }
            )
            rw, ro = ["rbind", "rprivate", "rw"], ["rbind", "rprivate", "ro"]
            mounts += [
                bind("/etc/hosts", self.hosts, rw),
                bind("/dev/termination-log", self.termination_log, rw),
                bind("/etc/hostname", self.hostname, rw),
                bind("/etc/resolv.conf", self.resolv, rw),
                bind("/data", self.volume, ro),
            ]
        config["mounts"] = mounts
        config["annotations"] = annotations
        message = oci_pb2.Spec()
        assert not ocispec.from_json(config, message)
        path = tmp / f"{name}.binpb"
        path.write_bytes(message.SerializeToString())
        return path


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bind(destination: str, source: Path, options: list[str]) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": str(source), "options": options}


async def replay(binary: Path, address: str, pod_file: Path) -> list[dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        str(binary), "-addr", address, "-pod", str(pod_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert proc.returncode == 0, (lines[-5:], err.decode())
    assert not [line for line in lines if "fatal" in line]
    return lines


Calls = dict[str, list[dict[str, Any]]]


def by_actor(lines: list[dict[str, Any]]) -> Calls:
    calls: Calls = collections.defaultdict(list)
    for line in lines:
        if "method" in line:
            calls[line["actor"]].append(line)
    return calls


def streams(lines: list[dict[str, Any]], actor: str) -> dict[str, bytes]:
    return {
        line["stream"]: base64.b64decode(line["data"] or "")
        for line in lines
        if line["actor"] == actor and "stream" in line
    }


def methods(calls: list[dict[str, Any]]) -> list[str]:
    return [call["method"] for call in calls]


def check_codes(calls: Calls) -> None:
    """Every answer has the code docs/api.md gives for its case, OK where no row applies."""
    table = documented_rows()
    for actor, lines in calls.items():
        seen: collections.Counter[str] = collections.Counter()
        for line in lines:
            n = seen[line["method"]]
            seen[line["method"]] += 1
            if actor == "oom":
                continue  # pending until the runtime disconnects: check_stop
            case = DOCUMENTED_CASES.get((actor, line["method"], n))
            expected = table[case] if case else Code.OK
            assert (Code(line["code"]), line.get("client_error")) == (expected, None), (
                actor,
                n,
                line,
            )


def check_sandbox(calls: Calls, pod: Pod) -> None:
    assert methods(calls["sandbox"]) == [
        "Check",
        "CreateSandbox",
        "GetGuestDetails",
        "DestroySandbox",
    ]
    check, _, details, _ = calls["sandbox"]
    assert check["serving"] == "SERVING"
    assert "ephemeral" in details["storage_handlers"]
    pause = calls["pause"]
    assert methods(pause) == [
        "CreateContainer",
        "StartContainer",
        "WaitProcess",
        "SignalProcess",
        "WaitProcess",
        "RemoveContainer",
        "RemoveStaleVirtiofsShareMounts",
    ]
    assert pause[2]["status"] == 128 + signal.SIGKILL  # the kubelet's SIGKILL
    shm = f"/dev/shm bind {pod.shared.parent.parent / 'sandbox' / 'shm'} rbind"
    assert shm in pause[0]["mounts"]


def check_container(calls: Calls, pod: Pod, out: dict[str, bytes]) -> None:
    app = calls["app"]
    copies = [c for c in app if c["method"] == "CopyFile"]
    assert methods(app) == [
        *["CopyFile"] * len(copies),
        "CreateContainer",
        "StartContainer",
        "StatsContainer",
        "WaitProcess",
        "SignalProcess",
        "WaitProcess",
        "GetDiagnosticData",
        "RemoveContainer",
        "RemoveStaleVirtiofsShareMounts",
    ]
    check_copies(copies, pod)

    # The spec as the runtime leaves it: no pid, network or cgroup namespace,
    # no paths, every shared file's source in the guest's shared directory.
    create = app[len(copies)]
    assert sorted(create["namespaces"]) == ["ipc=", "mount=", "uts="]
    assert create["sandbox_pidns"] is False and create["hooks"] is False
    sources = {m.split()[0]: m.split()[2] for m in create["mounts"]}
    for destination in ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/data"):
        name = Path(sources[destination]).name
        assert Path(sources[destination]).parent == pod.shared
        assert name.startswith(f"{pod.app_id}-") and name.endswith(Path(destination).name)
    assert create["annotations"]["io.kubernetes.cri.sandbox-id"] == pod.sandbox_id

    stats = app[len(copies) + 2]
    assert stats["memory_usage"] > 0 and stats["pids"] >= 1

    # What the container saw, and its stdin back, byte for byte.
    digest = hashlib.sha256(pod.blob.read_bytes()).hexdigest()
    expected = (
        f"pid=1\nhostname={POD_NAME}\netc-hostname={POD_NAME}\n"
        f"data={digest}  /data/latest\nshm=1777 {SHM_SIZE >> 10}\n"
        f"hosts:\n{HOSTS}resolv:\n{RESOLV}stdin:\n"
    ).encode()
    expected += pod.stdin.read_bytes() + f"stdin closed\n{STOP_MARKER}terminated\n".encode()
    assert out["stdout"] == expected
    assert out["stderr"] == b"init stderr\n"
    check_stdio(calls, "app", PAYLOAD)
    assert app[len(copies) + 3]["status"] == 3  # its TERM handler's exit


def check_copies(copies: list[dict[str, Any]], pod: Pod) -> None:
    """CopyFile as kata_agent.go copyFile sends it: 1 MiB chunks, the host's mode."""
    for copy in copies:
        assert copy["dir_mode"] == 0x80000000 | 0o750  # Go's os.ModeDir | 0750
        assert Path(copy["path"]).parent.is_relative_to(pod.shared)
    by_name = {Path(c["path"]).name.split("-", 2)[-1]: c for c in copies if c["offset"] == 0}
    assert by_name["hosts"]["file_size"] == len(HOSTS)
    assert by_name["hostname"]["file_mode"] == stat.S_IFREG | 0o644
    assert by_name["termination-log"]["file_size"] == 0
    assert stat.S_ISDIR(by_name["data"]["file_mode"])
    assert stat.S_ISLNK(by_name["latest"]["file_mode"])
    blob = [c for c in copies if c["path"].endswith("/blob")]
    assert [(c["offset"], c["len"]) for c in blob] == [
        (0, 1 << 20),
        (1 << 20, 1 << 20),
        (2 << 20, 1 << 19),
    ]
    assert {c["file_size"] for c in blob} == {5 << 19}


def check_stdio(calls: Calls, actor: str, stdin_size: int, terminal: bool = False) -> None:
    """The shim's copies: 32 KiB writes, each taken whole, then CloseStdin; 32 KiB
    reads until one answers no data."""
    stdin = calls[f"{actor} stdin"]
    assert methods(stdin)[-1] == "CloseStdin"
    writes = stdin[:-1]
    assert {w["method"] for w in writes} == {"WriteStdin"}
    assert [w["written"] for w in writes] == [w["len"] for w in writes]
    assert sum(w["len"] for w in writes) == stdin_size
    assert all(w["len"] <= 32768 for w in writes)
    for name in ("stdout",) if terminal else ("stdout", "stderr"):
        reads = calls[f"{actor} {name}"]
        assert {r["requested"] for r in reads} == {32768}
        assert reads[-1]["len"] == 0 and all(r["len"] > 0 for r in reads[:-1])
    if terminal:
        assert f"{actor} stderr" not in calls  # a terminal has no stderr copy


def check_exec(calls: Calls, pod: Pod, out: dict[str, bytes]) -> None:
    assert methods(calls["exec"]) == ["ExecProcess", "WaitProcess"]
    assert calls["exec"][1]["status"] == 7
    # In the container's PID namespace (its parent outside: 0), its init is PID 1.
    head = f"ppid=0 init=sh hostname={POD_NAME}\nnot pid 1\n".encode()
    assert out["stdout"] == head + pod.exec_stdin.read_bytes()
    assert out["stderr"] == b"exec stderr\n"
    check_stdio(calls, "exec", EXEC_PAYLOAD)


def check_terminal_exec(calls: Calls, out: dict[str, bytes]) -> None:
    assert methods(calls["tty"]) == [
        "TtyWinResize",  # before the exec starts: exec id "", the init, no terminal
        "ExecProcess",
        "TtyWinResize",
        "TtyWinResize",
        "WaitProcess",
    ]
    assert calls["tty"][4]["status"] == 5
    # the terminal echoes each line; the size changed between them
    assert out["stdout"] == b"one\r\na=one 40 120\r\ntwo\r\nb=two 50 132\r\n"
    check_stdio(calls, "tty", len("one\ntwo\n"), terminal=True)


def check_stop(calls: Calls, pod: Pod) -> None:
    assert methods(calls["kubelet"]) == ["SignalProcess", "SignalProcess"]
    diagnostic = next(c for c in calls["app"] if c["method"] == "GetDiagnosticData")
    assert diagnostic["data"] == f"bye from {POD_NAME}"
    assert pod.termination_log.read_text() == f"bye from {POD_NAME}"  # where the kubelet reads
    # The shim's OOM watch: GetOOMEvent pending (no OOM happened) until the runtime
    # disconnected after DestroySandbox; upstream's agent ends it with INTERNAL at
    # DestroySandbox, and the shim asks again once (see the test below).
    *ended, closed = calls["oom"]
    assert closed["client_error"] == "ttrpc: closed"
    assert [Code(line["code"]) for line in ended] in ([], [Code.INTERNAL])
    assert methods(calls["monitor"]) == ["Check"]


async def test_destroy_sandbox_ends_a_pending_get_oom_event(
    container_agent: AgentProcess,
) -> None:
    """Upstream's DestroySandbox closes the OOM event channel, so the shim's pending
    GetOOMEvent ends with INTERNAL (rpc.rs destroy_sandbox, get_oom_event), and
    stand-alone one sandbox's watcher would not take the next sandbox's events."""
    async with await Client.connect(container_agent.address) as client:
        api = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
        await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id=f"oom-{os.getpid()}"))
        pending = asyncio.ensure_future(api.GetOOMEvent(agent_pb2.GetOOMEventRequest()))
        await asyncio.sleep(0)  # the task runs until it waits: its request is sent first
        try:
            await api.DestroySandbox(agent_pb2.DestroySandboxRequest())
            with pytest.raises(TtrpcError) as exc:
                await asyncio.wait_for(pending, 5)  # a bound for "never", not a measurement
            assert exc.value.code == Code.INTERNAL
        finally:
            pending.cancel()
