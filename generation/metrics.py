"""Prometheus metrics of a worker process, served on ``IMAGINE_METRICS_PORT``."""

from __future__ import annotations

from typing import Protocol

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from generation.compiled import compiled_graphs, eager_runs, recompilations
from storage.errors import ConfigError
from storage.models import GenerationStatus


class HasBusySeconds(Protocol):
    busy_seconds: float


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.jobs = Counter(
            "imagine_jobs",
            "Jobs finished by this worker, by outcome",
            ["status"],
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "imagine_job_seconds",
            "Time from claim to recorded outcome",
            buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "imagine_queue_depth", "Jobs waiting for this worker's model", registry=self.registry
        )
        self.failures_in_a_row = Gauge(
            "imagine_worker_failures_in_a_row",
            "Jobs that failed on this worker since its last success",
            registry=self.registry,
        )
        self.stopped = Gauge(
            "imagine_worker_stopped",
            "1 once this worker stopped claiming jobs after too many failures in a row",
            registry=self.registry,
        )
        self.gpu_memory = Gauge(
            "imagine_gpu_memory_bytes", "GPU memory allocated by torch", registry=self.registry
        )
        self.compiled_graphs = Gauge(
            "imagine_compiled_graphs",
            "torch.compile graphs built in this process, warm-up included",
            registry=self.registry,
        )
        self.compiled_graphs.set_function(compiled_graphs)
        self.recompilations = Gauge(
            "imagine_recompilations",
            "torch.compile graphs built after the warm-up (sizes or paths it did not cover)",
            registry=self.registry,
        )
        self.recompilations.set_function(recompilations)
        self.eager_runs = Gauge(
            "imagine_compile_eager_runs",
            "Denoising calls after the warm-up whose size or batch it did not compile, run "
            "uncompiled rather than wait for a compile (IMAGINE_COMPILE_SIZES)",
            registry=self.registry,
        )
        self.eager_runs.set_function(eager_runs)
        self.engine_busy = Gauge(
            "imagine_engine_busy_seconds",
            "Seconds the engine spent in its pipelines (denoising and decoding). Its rate is "
            "the GPU's duty cycle: well below 1 with jobs queued, the worker waits on its "
            "own bookkeeping",
            registry=self.registry,
        )
        for status in GenerationStatus:
            if status.is_final:
                self.jobs.labels(status=status.value)

    def watch_engine(self, engine: HasBusySeconds) -> None:
        """Report ``engine.busy_seconds`` (read when scraped)."""
        self.engine_busy.set_function(lambda: engine.busy_seconds)

    def job_finished(self, status: GenerationStatus, seconds: float) -> None:
        self.jobs.labels(status=status.value).inc()
        self.job_seconds.observe(seconds)
        if torch.cuda.is_available():
            self.gpu_memory.set(torch.cuda.memory_allocated())

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"Cannot serve metrics on port {port} ({exc.strerror}); set "
                "IMAGINE_METRICS_PORT to a free port, or to 0 to turn metrics off."
            ) from None
