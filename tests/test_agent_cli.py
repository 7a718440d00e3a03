"""kata-agent as a user runs it: a real process on a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pykata import __version__
from pykata.agent.service import AgentService
from pykata.api import agent_pb2, health_pb2
from pykata.ttrpc import Client, Code, TtrpcError

from .conftest import AGENT, AgentProcess, run_agent
from .peers import wait_for_socket

AGENT_METHODS = [m.name for m in agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods]


async def test_answers_health_check_and_version(agent: AgentProcess) -> None:
    async with await Client.connect(agent.address) as client:
        check = await client.call(
            "grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
        )
        version = await client.call(
            "grpc.Health", "Version", health_pb2.CheckRequest(), health_pb2.VersionCheckResponse
        )
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert version.agent_version == __version__ and version.grpc_version


def test_every_agent_rpc_has_a_handler() -> None:
    assert [m for m in AGENT_METHODS if not hasattr(AgentService, m)] == []


#: Serves an agent in a fresh interpreter, calls Check, then an AgentService and an
#: Extensions method; prints which of the modules loaded on demand were loaded when.
LAZY_PROBE = """
import asyncio, json, sys, tempfile
from pathlib import Path
from pykata import log
from pykata.agent import cli, config
from pykata.agent.diagnostics import RecentLogs
from pykata.agent.runtime import OciRuntime
from pykata.api import health_pb2
from pykata.ttrpc import Client, TtrpcError
ON_DEMAND = ["pykata.api.agent_pb2", "pykata.agent.service", "pykata.agent.extensions",
             "pykata.spans", "pykata.agent.restore", "tomllib"]
def loaded():
    return [m for m in ON_DEMAND if m in sys.modules]
async def main():
    tmp = tempfile.mkdtemp()
    conf = config.AgentConfig(run_dir=tmp)
    recent = RecentLogs(log.JsonFormatter("kata-agent", "agent"))
    parts = cli.agent_parts(conf, OciRuntime("crun", Path(tmp) / "runtime"), recent)
    server = cli.make_server(conf, parts, None)
    await server.start(f"unix://{tmp}/a.sock")
    steps = {}
    async with await Client.connect(f"unix://{tmp}/a.sock") as client:
        check = await client.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                                  health_pb2.HealthCheckResponse)
        steps["check"] = [check.status, loaded()]
        from pykata.api import agent_pb2, extensions_pb2
        try:  # the handler's own answer: the path is outside the agent's directory
            await client.call("grpc.AgentService", "GetVolumeStats",
                              agent_pb2.VolumeStatsRequest(volume_guest_path="/no/such"),
                              health_pb2.HealthCheckResponse)
        except TtrpcError as exc:
            steps["agent"] = [exc.message, loaded()]
        caps = await client.call("pykata.Extensions", "GetCapabilities",
                                 extensions_pb2.CapabilitiesRequest(),
                                 extensions_pb2.Capabilities)
        steps["extensions"] = [len(caps.extensions) > 0, loaded()]
    await server.shutdown(grace=0)
    print(json.dumps(steps))
asyncio.run(main())
"""


def test_an_agent_answers_check_before_loading_what_no_one_called() -> None:
    """Start-up cost: the API's messages and the AgentService and Extensions handlers
    load on their first call, tracing's span machinery and TOML only when used."""
    out = subprocess.run(
        [sys.executable, "-c", LAZY_PROBE], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    steps = json.loads(out.stdout)
    assert steps["check"] == [health_pb2.HealthCheckResponse.SERVING, []]
    message, loaded = steps["agent"]
    assert "outside the agent's directory" in message
    assert loaded == ["pykata.api.agent_pb2", "pykata.agent.service"]
    assert steps["extensions"][0] is True
    assert "pykata.agent.extensions" in steps["extensions"][1]


async def test_unknown_methods_say_so_naming_them(agent: AgentProcess) -> None:
    async with await Client.connect(agent.address) as client:
        for method in ["NoSuchMethod", "createcontainer"]:
            with pytest.raises(TtrpcError) as exc:
                await client.call_raw("grpc.AgentService", method, b"")
            assert exc.value.code == Code.UNIMPLEMENTED
            assert f"grpc.AgentService/{method}" in exc.value.message
        # and the connection is still good afterwards
        await client.call(
            "grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
        )


def test_announce_line_and_sigterm_shutdown_removes_socket(agent: AgentProcess) -> None:
    assert agent.socket_path and os.path.exists(agent.socket_path)
    assert agent.stop(signal.SIGTERM) == 0
    assert not os.path.exists(agent.socket_path)
    lines = agent.log_lines()
    announce = next(line for line in lines if line["msg"] == "announce")
    for key in ("level", "ts", "subsystem", "pid", "source", "name"):
        assert key in announce
    assert announce["name"] == "kata-agent" and announce["version"] == __version__
    assert announce["config"]["server_addr"] == agent.address  # type: ignore[index]
    assert any(line["msg"] == "agent stopped" for line in lines)


def test_sigint_also_shuts_down_gracefully(agent: AgentProcess) -> None:
    assert agent.stop(signal.SIGINT) == 0
    assert agent.socket_path and not os.path.exists(agent.socket_path)


async def test_in_flight_call_survives_sigterm(tmp_path: Path) -> None:
    """SIGTERM while a call is pending: the answer still arrives before the agent exits."""
    with run_agent(f"unix://{tmp_path}/a.sock", tmp=tmp_path) as agent:
        async with await Client.connect(agent.address) as client:
            pending = [
                asyncio.ensure_future(
                    client.call(
                        "grpc.Health",
                        "Check",
                        health_pb2.CheckRequest(),
                        health_pb2.HealthCheckResponse,
                    )
                )
                for _ in range(50)
            ]
            agent.proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*pending, return_exceptions=True)
        assert agent.proc.wait(10) == 0
    served = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, TtrpcError)]
    assert len(served) + len(refused) == 50  # every call got an answer, none hung
    assert all(r.code == Code.UNAVAILABLE for r in refused)


def test_log_level_from_cmdline_and_env(tmp_path: Path) -> None:
    with run_agent(f"unix://{tmp_path}/a.sock", tmp=tmp_path, cmdline="agent.log=debug") as agent:
        agent.stop()
        assert agent.log_lines()[0]["config"]["log_level"] == "debug"  # type: ignore[index]
    with run_agent(
        f"unix://{tmp_path}/b.sock",
        tmp=tmp_path,
        cmdline="agent.log=debug",
        env={"KATA_AGENT_LOG_LEVEL": "error"},
    ) as agent:
        agent.stop()
        assert agent.log_lines() == []  # info lines suppressed at error level


@pytest.mark.parametrize(
    ("cmdline", "env", "message"),
    [
        ("agent.log=loud", {}, "agent.log: invalid log level 'loud'"),
        ("", {"KATA_AGENT_SERVER_ADDR": "tcp://0:1"}, "invalid address 'tcp://0:1'"),
        ("agent.container_pipe_size=-1", {}, "should not be negative"),
    ],
)
def test_bad_configuration_exits_non_zero_with_a_clear_message(
    tmp_path: Path, cmdline: str, env: dict[str, str], message: str
) -> None:
    (tmp_path / "cmdline").write_text(cmdline)
    env = {**os.environ, "KATA_AGENT_SERVER_ADDR": f"unix://{tmp_path}/a.sock", **env}
    result = subprocess.run(
        [*AGENT, "--kernel-cmdline", str(tmp_path / "cmdline")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_option(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'server_addr = "unix://{tmp_path}/from-file.sock"\nlog_level = "debug"\n')
    (tmp_path / "cmdline").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KATA_AGENT_")}
    proc = subprocess.Popen(
        [*AGENT, "--config", str(config), "--kernel-cmdline", str(tmp_path / "cmdline")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    agent = AgentProcess(proc, f"unix://{tmp_path}/from-file.sock", f"{tmp_path}/from-file.sock")
    try:
        wait_for_socket(f"{tmp_path}/from-file.sock", proc=proc)
    finally:
        assert agent.stop() == 0
    assert agent.log_lines()[0]["config"]["config_file"] == str(config)  # type: ignore[index]


def test_help_has_examples_and_version() -> None:
    out = subprocess.run([*AGENT, "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "KATA_AGENT_SERVER_ADDR" in out and "examples:" in out
    out = subprocess.run([*AGENT, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert out.strip() == f"kata-agent {__version__}"
