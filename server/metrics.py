"""Prometheus metrics: the queue, the GPU's work, LoRA caching and compile events, at `/metrics`.

One registry per app (not prometheus_client's global one), so several apps in one process (tests) do not
collide. Cumulative counts that live elsewhere (the LoRA caches, the worker's compile count) are read at
scrape time by a collector instead of being copied into counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.messages import WorkerStats
from server.fetch.disk_cache import DiskCache
from server.jobs import JobRecord
from server.outcome import Outcome

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
_SMALL_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, disk_cache: DiskCache) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flux2_requests", "Requests completed, by outcome (ok or the error_type)", ["outcome"], registry=r
        )
        self.queue_depth = Gauge("flux2_queue_depth", "Requests waiting for the worker", registry=r)
        self.queue_wait = Histogram(
            "flux2_queue_wait_seconds",
            "From acceptance to the start of generation",
            buckets=_SECONDS,
            registry=r,
        )
        self.inference = Histogram(
            "flux2_inference_seconds",
            "Generation time per request, by acceleration preset",
            ["acceleration"],
            buckets=_SECONDS,
            registry=r,
        )
        self.step = Histogram(
            "flux2_step_seconds",
            "Mean denoising step time per request, by acceleration preset",
            ["acceleration"],
            buckets=_SMALL_SECONDS,
            registry=r,
        )
        self.lora_switch = Histogram(
            "flux2_lora_switch_seconds",
            "Applying a request's LoRA set to the slots",
            buckets=_SMALL_SECONDS,
            registry=r,
        )
        self.worker_restarts = Counter(
            "flux2_worker_restarts", "GPU worker restarts after a crash or a hang", registry=r
        )
        self.watchdog_kills = Counter(
            "flux2_worker_watchdog_kills",
            "Hung GPU workers killed, by sign: run_timeout, silent, startup",
            ["reason"],
            registry=r,
        )
        self.lora_sets = Counter(
            "flux2_lora_sets_started",
            "Requests with LoRAs started, by whether the worker already held every one in memory (held: "
            "true); with several worker replicas, how well routing by LoRA set works",
            ["held"],
            registry=r,
        )
        self.stats: dict[str, WorkerStats] = {}  # the latest of each worker (scale-out has several)
        r.register(_CacheCollector(disk_cache, lambda: list(self.stats.values())))

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def started(self, record: JobRecord) -> None:
        if record.started_at is not None:
            self.queue_wait.observe(max(0.0, record.started_at - record.created_at))

    def completed(self, record: JobRecord, outcome: Outcome) -> None:
        self.requests.labels("ok" if outcome.ok else outcome.error_type or "error").inc()
        seconds = record.inference_seconds
        if outcome.ok and seconds is not None and record.params is not None:
            preset = record.params.acceleration
            self.inference.labels(preset).observe(seconds)
            self.step.labels(preset).observe(seconds / record.params.num_inference_steps)

    def worker_stats(self, stats: WorkerStats) -> None:
        self.stats[stats.worker] = stats
        self.lora_switch.observe(stats.lora_switch_seconds)


class _CacheCollector(Collector):
    """Cumulative figures kept by the LoRA disk cache and reported by the workers, summed over workers."""

    def __init__(self, disk: DiskCache, stats: Callable[[], list[WorkerStats]]) -> None:
        self.disk = disk
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        workers = self.stats()

        def total(figure: Callable[[WorkerStats], int]) -> int:
            return sum(map(figure, workers))

        events = {
            "hits": ("LoRA cache hits", self.disk.hits, total(lambda w: w.lora_memory_hits)),
            "misses": ("LoRA cache misses", self.disk.misses, total(lambda w: w.lora_memory_misses)),
            "evictions": (
                "LoRA cache evictions",
                self.disk.evictions,
                total(lambda w: w.lora_memory_evictions),
            ),
        }
        for event, (doc, disk, memory) in events.items():
            family = CounterMetricFamily(f"flux2_lora_cache_{event}", doc, labels=["cache"])
            family.add_metric(["disk"], disk)
            family.add_metric(["memory"], memory)
            yield family
        yield CounterMetricFamily(
            "flux2_compiled_graphs",
            "torch.compile graphs built by the workers",
            value=total(lambda w: w.compiled_graphs),
        )
        yield GaugeMetricFamily(
            "flux2_device_memory_bytes",
            "Accelerator memory allocated, all workers together",
            value=total(lambda w: w.device_memory_bytes),
        )
        yield GaugeMetricFamily(
            "flux2_device_memory_peak_bytes",
            "Peak accelerator memory allocated (the highest worker's)",
            value=max((w.device_peak_bytes for w in workers), default=0),
        )
