"""The agent policy through a real agent: a file at start, SetPolicy later."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from pykata.agent.policy import Policy
from pykata.api import agent_pb2, oci_pb2
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import AGENT, run_container_agent
from .containers import spec

SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]

POLICY = """
default = "allow"

[[rules]]
name = "exec: only ls"
methods = ["ExecProcess"]
decision = "deny"
unless = { "process.Args[0]" = ["ls", "/bin/ls"] }

[[rules]]
name = "copy: container files only"
methods = ["CopyFile"]
decision = "deny"
unless = { path = ["*/shared/containers/*"] }

[[rules]]
name = "no swap"
methods = ["AddSwap*"]
decision = "deny"
"""


async def test_policy_file_decides_per_request(tmp_path: Path, rootfs: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    shared = tmp_path / "run/shared"
    with run_container_agent(tmp_path, env={"KATA_AGENT_POLICY_FILE": str(policy)}) as agent:
        async with await Client.connect(agent.address) as client:
            api = Stub(client, SERVICE)
            await api.CreateContainer(
                agent_pb2.CreateContainerRequest(container_id="pp", OCI=spec(rootfs, "sleep", "60"))
            )
            await api.StartContainer(agent_pb2.StartContainerRequest(container_id="pp"))

            def exec_(n: int, *args: str) -> agent_pb2.ExecProcessRequest:
                return agent_pb2.ExecProcessRequest(
                    container_id="pp", exec_id=f"e{n}", process=oci_pb2.Process(Args=args, Cwd="/")
                )

            await api.ExecProcess(exec_("1", "ls", "/"))
            assert (
                await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="pp", exec_id="e1"))
            ).status == 0
            with pytest.raises(TtrpcError) as exc:
                await api.ExecProcess(exec_("2", "cat", "/etc/passwd"))
            assert exc.value.code == Code.PERMISSION_DENIED
            assert "'exec: only ls'" in exc.value.message and "ExecProcess" in exc.value.message

            file_mode = stat.S_IFREG | 0o644
            await api.CopyFile(
                agent_pb2.CopyFileRequest(
                    path=f"{shared}/containers/ok", data=b"x", file_size=1, file_mode=file_mode
                )
            )
            with pytest.raises(TtrpcError) as exc:
                await api.CopyFile(
                    agent_pb2.CopyFileRequest(
                        path=f"{shared}/elsewhere", data=b"x", file_size=1, file_mode=file_mode
                    )
                )
            assert exc.value.code == Code.PERMISSION_DENIED and "copy:" in exc.value.message
            assert not (shared / "elsewhere").exists()
            with pytest.raises(TtrpcError) as exc:
                await api.AddSwapPath(agent_pb2.AddSwapPathRequest(path="/swap"))
            assert exc.value.code == Code.PERMISSION_DENIED and "no swap" in exc.value.message

            # SetPolicy replaces the policy (and is itself subject to it)
            await api.SetPolicy(
                agent_pb2.SetPolicyRequest(
                    policy='default = "deny"\n[[rules]]\nname = "health"\n'
                    'methods = ["Check", "SetPolicy", "RemoveContainer"]\ndecision = "allow"\n'
                )
            )
            with pytest.raises(TtrpcError) as exc:
                await api.ExecProcess(exec_("3", "ls"))
            assert exc.value.code == Code.PERMISSION_DENIED and "'default'" in exc.value.message
            for bad, named in (
                ('default = "maybe"', "default must be allow or deny"),
                (
                    "[[rules]]\nmethods = ['ExecProcess']\ndecision = 'deny'\n"
                    "when = { 'process.Argz' = ['x'] }",
                    "no field 'Argz'",
                ),
                ("[[rules]]\nmethods = ['NoSuchRpc']\ndecision = 'deny'", "match no RPC"),
                ("default = ", "not valid TOML"),
            ):
                with pytest.raises(TtrpcError) as exc:
                    await api.SetPolicy(agent_pb2.SetPolicyRequest(policy=bad))
                assert exc.value.code == Code.INVALID_ARGUMENT and named in exc.value.message
            await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="pp"))
        assert agent.stop() == 0
    denials = [line for line in agent.log_lines() if line["msg"] == "policy denies"]
    assert {line["rule"] for line in denials} == {
        "exec: only ls",
        "copy: container files only",
        "no swap",
        "default",
    }


def test_bad_policy_file_stops_the_agent(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[rules]]\nmethods = ["CopyFile"]\ndecision = "deny"\nwhen = { pth = "x" }\n'
    )
    (tmp_path / "cmdline").write_text("")
    result = subprocess.run(
        [*AGENT, "--kernel-cmdline", str(tmp_path / "cmdline")],
        env={
            "KATA_AGENT_SERVER_ADDR": f"unix://{tmp_path}/a.sock",
            "KATA_AGENT_POLICY_FILE": str(policy),
            "KATA_AGENT_RUN_DIR": str(tmp_path / "run"),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "CopyRequest" not in result.stderr and "no field 'pth'" in result.stderr


def test_repeated_fields_match_element_by_element() -> None:
    policy = Policy.parse(
        'default = "deny"\n[[rules]]\nname = "env"\nmethods = ["ExecProcess"]\n'
        'decision = "allow"\nwhen = { "process.Env" = ["PATH=*", "TERM=*"] }\n',
        "test",
    )

    def request(*env: str) -> agent_pb2.ExecProcessRequest:
        return agent_pb2.ExecProcessRequest(process=oci_pb2.Process(Env=env))

    assert policy.decide("ExecProcess", request("PATH=/bin", "TERM=xterm")).allowed
    assert not policy.decide("ExecProcess", request("PATH=/bin", "LD_PRELOAD=/x.so")).allowed
    assert policy.decide("CreateContainer", agent_pb2.CreateContainerRequest()).rule == "default"


def test_the_documented_example_is_a_valid_policy() -> None:
    docs = (Path(__file__).parent.parent / "docs/policy.md").read_text()
    example = docs.split("```toml\n", 1)[1].split("```", 1)[0]
    policy = Policy.parse(example, "docs/policy.md")
    exec_ls = agent_pb2.ExecProcessRequest(process=oci_pb2.Process(Args=["ls"], Env=["PATH=/bin"]))
    assert policy.decide("ExecProcess", exec_ls).allowed
    preload = agent_pb2.ExecProcessRequest(
        process=oci_pb2.Process(Args=["ls"], Env=["PATH=/bin", "LD_PRELOAD=/evil.so"])
    )
    assert policy.decide("ExecProcess", preload).rule == "exec: plain environment"
