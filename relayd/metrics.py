"""`/metrics`: the Prometheus text exposition, aggregated over every worker by whichever answers.

Counters are never shared on the data path: each worker counts in plain Python ints and
publishes them into its own stats block in the arena about once a second (ring.STATS_U64
u64 per worker, one writer each); the supervisor publishes pipe and transfer counts into its
block. A scrape reads those blocks, adds psutil's view of each live worker (RSS, CPU, fds)
and renders with prometheus_client's exposition code. Measured in the design: a shared-memory
counter costs 0.15 us per increment against 1.65 us for prometheus_client's multiprocess mode,
and publishing once a second costs nothing per chunk.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from relayd import __version__, ring

if TYPE_CHECKING:
    from relayd.worker import Worker

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class ArenaCollector:
    """A prometheus_client collector reading the arena's stats blocks at scrape time."""

    def __init__(self, worker: "Worker"):
        self.worker = worker

    def collect(self):
        w = self.worker
        w.publish_stats(reschedule=False)          # this worker's figures are exact
        a = w.arena
        sup = lambda field: a.load(a.sup_index(field))  # noqa: E731
        live = [i for i in range(a.worker_slots) if a.load(a.stat_index(i, ring.STAT_PID))]
        stat = lambda i, field: a.load(a.stat_index(i, field))  # noqa: E731

        info = GaugeMetricFamily("relayd_build_info", "relayd version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        pipes = GaugeMetricFamily("relayd_pipes", "Pipes known to the relay, by state",
                                  labels=["state"])
        pipes.add_metric(["waiting"], sup(ring.SUP_PIPES_WAITING))
        pipes.add_metric(["streaming"], sup(ring.SUP_PIPES_STREAMING))
        yield pipes
        yield GaugeMetricFamily("relayd_ring_slots_in_use", "Ring slots held by transfers",
                                value=sup(ring.SUP_SLOTS_IN_USE))
        yield GaugeMetricFamily("relayd_arena_resident_bytes",
                                "Shared-memory arena bytes backed by memory",
                                value=a.resident_bytes())
        yield GaugeMetricFamily("relayd_workers_alive", "Worker processes running",
                                value=len(live))
        yield CounterMetricFamily("relayd_worker_restarts", "Workers respawned after dying",
                                  value=sup(ring.SUP_RESTARTS))
        transfers = CounterMetricFamily("relayd_transfers", "Transfers ended, by outcome",
                                        labels=["outcome"])
        for k, outcome in enumerate(ring.TRANSFER_OUTCOMES):
            transfers.add_metric([outcome], sup(ring.SUP_OUTCOME0 + k))
        yield transfers

        def per_worker(name, doc, field, kind=GaugeMetricFamily):
            family = kind(name, doc, labels=["worker"])
            for i in live:
                family.add_metric([str(i)], stat(i, field))
            return family

        yield per_worker("relayd_connections", "Open client connections",
                         ring.STAT_CONNECTIONS)
        yield per_worker("relayd_receivers_streaming", "Receivers being sent a body",
                         ring.STAT_RECEIVERS_STREAMING)
        yield per_worker("relayd_senders_streaming", "Senders whose body is being relayed",
                         ring.STAT_SENDERS_STREAMING)
        yield per_worker("relayd_receiver_lag_max_bytes",
                         "Bytes the slowest streaming receiver is behind its producer",
                         ring.STAT_MAX_LAG)
        yield per_worker("relayd_spill_bytes",
                         "Bytes this worker's pipes keep in spill files (the lag beyond the "
                         "window)", ring.STAT_SPILL_BYTES)
        yield per_worker("relayd_senders_joined", "Senders that joined a pipe",
                         ring.STAT_SENDERS, CounterMetricFamily)
        yield per_worker("relayd_receivers_joined", "Receivers that joined a pipe",
                         ring.STAT_RECEIVERS, CounterMetricFamily)
        yield per_worker("relayd_received_bytes", "Body bytes received from senders",
                         ring.STAT_BYTES_IN, CounterMetricFamily)
        yield per_worker("relayd_sent_bytes", "Bytes sent to receivers",
                         ring.STAT_BYTES_OUT, CounterMetricFamily)
        rejected = CounterMetricFamily("relayd_rejected_requests",
                                       "Requests answered with an error, by status",
                                       labels=["worker", "status"])
        for i in live:
            for k, status in enumerate(ring.REJECTION_STATUSES):
                count = stat(i, ring.STAT_REJECTED0 + k)
                if count:
                    rejected.add_metric([str(i), str(status or "other")], count)
        yield rejected

        rss = GaugeMetricFamily("relayd_process_resident_bytes", "Resident memory",
                                labels=["process"])
        cpu = CounterMetricFamily("relayd_process_cpu_seconds", "CPU time, user + system",
                                  labels=["process"])
        fds = GaugeMetricFamily("relayd_process_open_fds", "Open file descriptors",
                                labels=["process"])
        processes = [("supervisor", w.parent_pid)] + [
            (f"worker{i}", stat(i, ring.STAT_PID)) for i in live]
        for name, pid in processes:
            try:
                p = psutil.Process(pid)
                with p.oneshot():
                    mem, times, nfds = p.memory_info().rss, p.cpu_times(), p.num_fds()
            except (psutil.Error, OSError):
                continue
            rss.add_metric([name], mem)
            cpu.add_metric([name], times.user + times.system)
            fds.add_metric([name], nfds)
        yield rss
        yield cpu
        yield fds


def render(worker: "Worker") -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ArenaCollector(worker))
    return generate_latest(registry)
