"""`/metrics` (Prometheus text) and `/health` (JSON), rendered from a `stats.Snapshot`.

Whichever worker answers reads every stats block of the arena into a snapshot first
(stats.read), so both documents describe the whole node. /metrics adds psutil's view of each
live process (RSS, CPU, descriptors); prometheus_client renders the exposition text.
"""
from __future__ import annotations

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from relayd import __version__
from relayd.stats import Snapshot

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def health(snapshot: Snapshot, draining: bool, answered_by: int) -> dict:
    """The /health document; status "draining" (answered with 503) while stopping."""
    s = snapshot
    return {
        "status": "draining" if draining else "ok",
        "version": __version__,
        "uptime_s": round(s.uptime_s, 3),
        "answered_by": answered_by,
        "workers_alive": len(s.workers),
        "pipes_waiting": s.pipes_waiting,
        "pipes_streaming": s.pipes_streaming,
        "slots_in_use": s.slots_in_use,
        "transfers_done": s.transfers_done,
        "transfers_aborted": s.transfers_aborted,
        "worker_restarts": s.worker_restarts,
        "arena_resident_bytes": s.arena_resident_bytes,
        "workers": [{"index": w.index, "pid": w.pid, "connections": w.connections,
                     "senders": w.senders, "receivers": w.receivers, "bytes_in": w.bytes_in,
                     "bytes_out": w.bytes_out, "active_transfers": w.active_transfers,
                     "receiver_lag_max_bytes": w.receiver_lag_max_bytes,
                     "spill_bytes": w.spill_bytes,
                     "spill_write_failures": w.spill_write_failures}
                    for w in s.workers],
    }


class SnapshotCollector:
    """A prometheus_client collector over one snapshot."""

    def __init__(self, snapshot: Snapshot, supervisor_pid: int):
        self.snapshot = snapshot
        self.supervisor_pid = supervisor_pid

    def collect(self):
        s = self.snapshot
        info = GaugeMetricFamily("relayd_build_info", "relayd version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        pipes = GaugeMetricFamily("relayd_pipes", "Pipes known to the relay, by state",
                                  labels=["state"])
        pipes.add_metric(["waiting"], s.pipes_waiting)
        pipes.add_metric(["streaming"], s.pipes_streaming)
        yield pipes
        yield GaugeMetricFamily("relayd_ring_slots_in_use", "Ring slots held by transfers",
                                value=s.slots_in_use)
        yield GaugeMetricFamily("relayd_arena_resident_bytes",
                                "Shared-memory arena bytes backed by memory",
                                value=s.arena_resident_bytes)
        yield GaugeMetricFamily("relayd_workers_alive", "Worker processes running",
                                value=len(s.workers))
        yield CounterMetricFamily("relayd_worker_restarts", "Workers respawned after dying",
                                  value=s.worker_restarts)
        transfers = CounterMetricFamily("relayd_transfers", "Transfers ended, by outcome",
                                        labels=["outcome"])
        for outcome, count in s.outcomes.items():
            transfers.add_metric([outcome.value], count)
        yield transfers

        def per_worker(name, doc, attribute, kind=GaugeMetricFamily):
            family = kind(name, doc, labels=["worker"])
            for w in s.workers:
                family.add_metric([str(w.index)], getattr(w, attribute))
            return family

        yield per_worker("relayd_connections", "Open client connections", "connections")
        yield per_worker("relayd_receivers_streaming", "Receivers being sent a body",
                         "receivers_streaming")
        yield per_worker("relayd_senders_streaming", "Senders whose body is being relayed",
                         "senders_streaming")
        yield per_worker("relayd_receiver_lag_max_bytes",
                         "Bytes the slowest streaming receiver is behind its producer",
                         "receiver_lag_max_bytes")
        yield per_worker("relayd_spill_bytes",
                         "Bytes this worker's pipes keep in spill files (the lag beyond the "
                         "window)", "spill_bytes")
        yield per_worker("relayd_spill_write_failures",
                         "Spill file writes the disk refused (ENOSPC, EIO): the pipe then "
                         "holds its producer (--slow block) or cuts its slowest (drop)",
                         "spill_write_failures", CounterMetricFamily)
        yield per_worker("relayd_receivers_handed_over",
                         "Receivers of n = 1 pipes whose socket this worker passed to the "
                         "sender's worker (splice)", "handed_over", CounterMetricFamily)
        yield per_worker("relayd_senders_joined", "Senders that joined a pipe", "senders",
                         CounterMetricFamily)
        yield per_worker("relayd_receivers_joined", "Receivers that joined a pipe",
                         "receivers", CounterMetricFamily)
        yield per_worker("relayd_received_bytes", "Body bytes received from senders",
                         "bytes_in", CounterMetricFamily)
        yield per_worker("relayd_sent_bytes", "Bytes sent to receivers", "bytes_out",
                         CounterMetricFamily)
        rejected = CounterMetricFamily("relayd_rejected_requests",
                                       "Requests answered with an error, by status",
                                       labels=["worker", "status"])
        for w in s.workers:
            for status, count in w.rejections.items():
                rejected.add_metric([str(w.index), str(status or "other")], count)
        yield rejected

        rss = GaugeMetricFamily("relayd_process_resident_bytes", "Resident memory",
                                labels=["process"])
        cpu = CounterMetricFamily("relayd_process_cpu_seconds", "CPU time, user + system",
                                  labels=["process"])
        fds = GaugeMetricFamily("relayd_process_open_fds", "Open file descriptors",
                                labels=["process"])
        processes = [("supervisor", self.supervisor_pid)] + [
            (f"worker{w.index}", w.pid) for w in s.workers]
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


def prometheus(snapshot: Snapshot, supervisor_pid: int) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot, supervisor_pid))
    return generate_latest(registry)
