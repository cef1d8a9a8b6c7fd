"""/metrics for a whole Ray Serve deployment of llmrun (ray_replicas): each replica's metrics
(llmrun.serve.metrics) summed over the replicas.

Each ModelReplica sends its registry's samples to the one MetricsHub after every request and
at each of Ray's health checks of it (every 10 s); the Router answers GET /metrics with the
hub's sums, so counters, histograms and the gauges (requests running and waiting, KV cache
slots) read as those of one server with every replica's slots. A replica that stopped
reporting for STALE_S seconds (gone, or replaced) leaves the sums."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

STALE_S = 30.0

# (family name, type, help, [(sample name, sorted label pairs, value)]) per metric family
Snapshot = list[tuple[str, str, str, list[tuple[str, tuple, float]]]]


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """A registry's samples, without the `_created` ones (times, which do not add up)."""
    return [(family.name, family.type, family.documentation,
             [(s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples
              if not s.name.endswith("_created")])
            for family in registry.collect()]


class _Sums:
    """A prometheus_client collector: the samples of several snapshots, added by name and labels
    (in the first snapshot's order, which keeps a histogram's buckets in theirs)."""

    def __init__(self, snapshots: list[Snapshot]):
        self.snapshots = snapshots

    def collect(self):
        families: dict[str, tuple[str, str, dict]] = {}
        for snap in self.snapshots:
            for name, kind, doc, samples in snap:
                sums = families.setdefault(name, (kind, doc, {}))[2]
                for sample, labels, value in samples:
                    sums[sample, labels] = sums.get((sample, labels), 0.0) + value
        for name, (kind, doc, sums) in families.items():
            metric = Metric(name, doc, kind)
            for (sample, labels), value in sums.items():
                metric.add_sample(sample, dict(labels), value)
            yield metric


class MetricsHub:
    """The replicas' latest snapshots (a Ray Serve deployment of one replica)."""

    def __init__(self):
        self._latest: dict[str, tuple[float, Snapshot]] = {}  # replica -> (when, its snapshot)

    def put(self, replica: str, snap: Snapshot) -> None:
        self._latest[replica] = (time.monotonic(), snap)

    def text(self) -> bytes:
        """The Prometheus text of the sums over the replicas heard from within STALE_S."""
        now = time.monotonic()
        registry = CollectorRegistry()
        registry.register(_Sums([snap for when, snap in self._latest.values() if now - when < STALE_S]))
        return generate_latest(registry)
