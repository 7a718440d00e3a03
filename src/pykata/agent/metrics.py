"""GetMetrics: the agent's and the guest's metrics in the Prometheus text format.

Names follow upstream's agent (`kata_agent_*` for the agent process,
`kata_guest_*` for the guest, one gauge per /proc file with an `item`
label), so dashboards built for upstream keep working. Stand-alone on a
host, "the guest" is what the agent sees of that host.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import tracing

PROC = Path("/proc")
#: /proc/diskstats columns after the device name.
DISKSTAT_ITEMS = (
    "reads",
    "reads_merged",
    "sectors_read",
    "time_reading_ms",
    "writes",
    "writes_merged",
    "sectors_written",
    "time_writing_ms",
    "io_in_progress",
    "time_io_ms",
    "weighted_time_io_ms",
)
NETDEV_ITEMS = (
    "recv_bytes",
    "recv_packets",
    "recv_errs",
    "recv_drop",
    "recv_fifo",
    "recv_frame",
    "recv_compressed",
    "recv_multicast",
    "sent_bytes",
    "sent_packets",
    "sent_errs",
    "sent_drop",
    "sent_fifo",
    "sent_colls",
    "sent_carrier",
    "sent_compressed",
)
CPU_ITEMS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


class GuestCollector(Collector):
    """The guest's memory, CPU, load, network and disk, read fresh on every scrape."""

    def __init__(self, proc: Path = PROC) -> None:
        self.proc = proc

    def collect(self) -> Iterator[Metric]:
        yield self._meminfo()
        yield self._load()
        yield self._cpu()
        yield self._netdev()
        yield self._diskstats()

    def _meminfo(self) -> Metric:
        family = GaugeMetricFamily(
            "kata_guest_meminfo", "Guest memory from /proc/meminfo, in bytes", labels=["item"]
        )
        for line in (self.proc / "meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            value, *unit = rest.split()
            family.add_metric([name], float(value) * (1024 if unit == ["kB"] else 1))
        return family

    def _load(self) -> Metric:
        family = GaugeMetricFamily(
            "kata_guest_load", "Guest load averages from /proc/loadavg", labels=["item"]
        )
        fields = (self.proc / "loadavg").read_text().split()
        for item, value in zip(("load1", "load5", "load15"), fields, strict=False):
            family.add_metric([item], float(value))
        return family

    def _cpu(self) -> Metric:
        family = GaugeMetricFamily(
            "kata_guest_cpu_time",
            "Guest CPU time from /proc/stat, in seconds",
            labels=["cpu", "item"],
        )
        tick = os.sysconf("SC_CLK_TCK")
        for line in (self.proc / "stat").read_text().splitlines():
            if not line.startswith("cpu"):
                continue
            cpu, *values = line.split()
            for item, value in zip(CPU_ITEMS, values, strict=False):
                family.add_metric([cpu, item], int(value) / tick)
        return family

    def _netdev(self) -> Metric:
        family = GaugeMetricFamily(
            "kata_guest_netdev_stat",
            "Guest network devices from /proc/net/dev",
            labels=["interface", "item"],
        )
        for line in (self.proc / "net/dev").read_text().splitlines()[2:]:
            name, _, rest = line.partition(":")
            for item, value in zip(NETDEV_ITEMS, rest.split(), strict=False):
                family.add_metric([name.strip(), item], float(value))
        return family

    def _diskstats(self) -> Metric:
        family = GaugeMetricFamily(
            "kata_guest_diskstat", "Guest disks from /proc/diskstats", labels=["disk", "item"]
        )
        for line in (self.proc / "diskstats").read_text().splitlines():
            fields = line.split()
            for item, value in zip(DISKSTAT_ITEMS, fields[3:], strict=False):
                family.add_metric([fields[2], item], float(value))
        return family


class TracingCollector(Collector):
    """The agent's spans: how many went to the trace forwarder, how many were dropped."""

    def collect(self) -> Iterator[Metric]:
        exported, dropped = tracing.counters()
        yield CounterMetricFamily(
            "kata_agent_trace_spans_exported", "Spans sent to the trace forwarder", exported
        )
        yield CounterMetricFamily(
            "kata_agent_trace_spans_dropped",
            "Spans dropped (buffer full, forwarder away at shutdown, too large)",
            dropped,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(namespace="kata_agent", registry=self.registry)
        self.registry.register(GuestCollector())
        self.registry.register(TracingCollector())
        self.scrapes = Counter(
            "kata_agent_scrape", "Times GetMetrics was answered", registry=self.registry
        )

    def text(self) -> str:
        self.scrapes.inc()
        return generate_latest(self.registry).decode()
