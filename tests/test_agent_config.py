"""Agent configuration: kernel command line, TOML file, environment, as upstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykata.agent.config import AgentConfig, ConfigError, apply_env, from_cmdline, from_file, load


def test_defaults_match_upstream() -> None:
    config = AgentConfig()
    assert config.server_addr == "vsock://-1:1024"
    assert (config.log_level, config.hotplug_timeout, config.container_pipe_size) == ("info", 3, 0)
    assert not (config.debug_console or config.dev_mode or config.tracing)


def test_cmdline_options_and_flags() -> None:
    config = from_cmdline(
        "console=ttyS0 agent.debug_console agent.log=debug agent.hotplug_timeout=10 "
        "agent.server_addr=vsock://-1:2048 agent.container_pipe_size=65536 agent.trace=true "
        "agent.debug_console_vport=1026 agent.log_vport=1025 systemd.unified_cgroup_hierarchy=1\n"
    )
    assert config.debug_console and config.tracing and config.unified_cgroup_hierarchy
    assert config.log_level == "debug"
    assert (config.hotplug_timeout, config.container_pipe_size) == (10, 65536)
    assert (config.debug_console_vport, config.log_vport) == (1026, 1025)
    assert config.server_addr == "vsock://-1:2048"


@pytest.mark.parametrize(
    ("cmdline", "field", "value"),
    [
        ("agent.debug_consolex agent.devmode", "debug_console", False),  # near-misses don't count
        ("agent.devmode", "dev_mode", True),
        ("agent.trace", "tracing", True),  # bare flag, Kata 1.x style
        ("agent.trace=false", "tracing", False),
        ("agent.trace=banana", "tracing", False),  # neither bool nor number: false
        ("agent.logx=debug", "log_level", "info"),
        ("agent.hotplug_timeout=0", "hotplug_timeout", 3),  # not positive: ignored
        ("agent.log_vport=0", "log_vport", 0),
        ("agent.debug_console_vport=-5", "debug_console_vport", 0),
    ],
)
def test_cmdline_edge_cases_as_upstream(cmdline: str, field: str, value: object) -> None:
    assert getattr(from_cmdline(cmdline), field) == value


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        ("agent.log=loud", "agent.log: invalid log level 'loud'"),
        ("agent.hotplug_timeout=soon", "agent.hotplug_timeout: unable to parse timeout"),
        ("agent.hotplug_timeout=-1", "agent.hotplug_timeout: unable to parse timeout"),
        ("agent.container_pipe_size=-1", "container pipe size should not be negative"),
        ("agent.container_pipe_size=big", "agent.container_pipe_size: unable to parse pipe size"),
        ("agent.log_vport=x", "agent.log_vport: unable to parse vsock port"),
    ],
)
def test_unparsable_values_stop_the_agent_naming_the_option(cmdline: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_cmdline(cmdline)


def test_unknown_agent_options_are_reported_not_fatal() -> None:
    config = from_cmdline("agent.debug_consol agent.log=info quiet")
    assert config.ignored_options == ["agent.debug_consol"]


def test_config_file_replaces_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('log_level = "debug"\ndev_mode = true\nserver_addr = "unix:///tmp/x.sock"\n')
    config = from_cmdline(f"agent.debug_console agent.config_file={path} agent.trace")
    assert config.log_level == "debug" and config.dev_mode
    assert not config.debug_console and not config.tracing  # the rest of the cmdline is not read
    assert config.config_file == str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("log_level = 3", "log_level must be a str"),
        ('log_levl = "debug"', "unknown setting 'log_levl'"),
        ("hotplug_timeout = true", "hotplug_timeout must be a int"),
        ("container_pipe_size = -4", "container_pipe_size should not be negative"),
        ("this is = not toml", "cannot parse agent config file"),
        ('log_level = "chatty"', "invalid log level 'chatty'"),
    ],
)
def test_bad_config_files_are_refused_clearly(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        from_file(str(path))


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read agent config file .*No such file"):
        from_cmdline(f"agent.config_file={tmp_path}/absent.toml")


def test_environment_wins_over_cmdline_and_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('server_addr = "vsock://-1:9"\nlog_level = "error"\n')
    env = {
        "KATA_AGENT_SERVER_ADDR": "unix:///tmp/dev.sock",
        "KATA_AGENT_LOG_LEVEL": "trace",
        "KATA_AGENT_TRACING": "true",
    }
    config = load(config_file=str(path), env=env)
    assert (config.server_addr, config.log_level, config.tracing) == (
        "unix:///tmp/dev.sock",
        "trace",
        True,
    )
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("agent.log=debug agent.server_addr=vsock://-1:7")
    config = load(cmdline_path=str(cmdline), env=env)
    assert (config.server_addr, config.log_level) == ("unix:///tmp/dev.sock", "trace")


def test_bad_env_log_level_is_ignored_as_upstream_but_reported() -> None:
    config = apply_env(AgentConfig(log_level="debug"), {"KATA_AGENT_LOG_LEVEL": "loud"})
    assert config.log_level == "debug"
    assert config.ignored_options == ["KATA_AGENT_LOG_LEVEL=loud"]


def test_limits_from_every_source_reach_the_server() -> None:
    defaults = AgentConfig().server_limits()
    assert (defaults.max_connections, defaults.max_calls_per_connection) == (128, 1024)
    config = from_cmdline("agent.max_connections=7 agent.frame_timeout=2.5 agent.reserved_fds=64")
    assert (config.max_connections, config.frame_timeout, config.reserved_fds) == (7, 2.5, 64)
    env = {"KATA_AGENT_MAX_CALLS": "99", "KATA_AGENT_LOG_QUEUE_BYTES": "4096"}
    config = apply_env(config, env)
    limits = config.server_limits()
    assert (limits.max_connections, limits.max_calls, limits.frame_timeout) == (7, 99, 2.5)
    assert config.log_queue_bytes == 4096


def test_limits_in_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("max_calls_per_connection = 64\nframe_timeout = 3\npeer_log_rate = 0.5\n")
    config = from_file(str(path))
    assert (config.max_calls_per_connection, config.frame_timeout) == (64, 3.0)
    assert config.peer_log_rate == 0.5


@pytest.mark.parametrize(
    ("cmdline", "env", "message"),
    [
        ("agent.max_connections=0", {}, "agent.max_connections: must be a positive number, got 0"),
        ("agent.frame_timeout=soon", {}, "agent.frame_timeout: unable to parse number 'soon'"),
        ("agent.frame_timeout=inf", {}, "agent.frame_timeout: must be a positive number"),
        ("", {"KATA_AGENT_MAX_CALLS": "lots"}, "KATA_AGENT_MAX_CALLS: unable to parse number"),
        (
            "agent.reply_high_water=4096 agent.max_queued_replies=1024",
            {},
            "max_queued_replies .* must be at least reply_high_water",
        ),
        ("agent.max_frame_bytes=1024", {}, "must hold the largest frame"),
    ],
)
def test_bad_limits_stop_the_agent_naming_them(
    tmp_path: Path, cmdline: str, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "cmdline"
    path.write_text(cmdline)
    with pytest.raises(ConfigError, match=message):
        load(cmdline_path=str(path), env=env)


def test_busy_poll_is_off_by_default_and_bounded() -> None:
    assert AgentConfig().busy_poll_us == 0
    assert from_cmdline("agent.busy_poll_us=50").busy_poll_us == 50
    assert apply_env(AgentConfig(), {"KATA_AGENT_BUSY_POLL_US": "0"}).busy_poll_us == 0
    for bad in ("-1", "10001", "fast"):
        with pytest.raises(ConfigError, match=r"agent\.busy_poll_us"):
            from_cmdline(f"agent.busy_poll_us={bad}")


def test_extension_limits_from_every_source() -> None:
    defaults = AgentConfig().extension_limits()
    assert (defaults.window_bytes, defaults.max_forwards) == (4 << 20, 64)
    config = from_cmdline("agent.max_forwards=3 agent.window_bytes=1048576")
    config = apply_env(config, {"KATA_AGENT_MAX_CHUNK_BYTES": "262144"})
    limits = config.extension_limits()
    assert (limits.max_forwards, limits.window_bytes, limits.max_chunk_bytes) == (
        3,
        1 << 20,
        256 << 10,
    )


def test_extension_limits_in_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("max_watches = 2\nwatch_queue_events = 100\n")
    limits = from_file(str(path)).extension_limits()
    assert (limits.max_watches, limits.watch_queue_events) == (2, 100)


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        ("agent.max_execs=0", "agent.max_execs: must be a positive number, got 0"),
        ("agent.max_chunk_bytes=4194304", "max_chunk_bytes .* at most a quarter of window_bytes"),
        ("agent.watch_window_events=10", "watch_window_events must be at least 256"),
    ],
)
def test_bad_extension_limits_stop_the_agent_naming_them(
    tmp_path: Path, cmdline: str, message: str
) -> None:
    path = tmp_path / "cmdline"
    path.write_text(cmdline)
    with pytest.raises(ConfigError, match=message):
        load(cmdline_path=str(path), env={})
