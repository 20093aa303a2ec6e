"""``torch.compile`` of the denoiser and the VAE decoder: whether, how, and what it cost.

Shapes are static (``dynamic=False``): each image size, batch and style path gets
kernels of its own, and the engine's warm-up compiles the sizes of the ``--ar`` ratios
in ``IMAGINE_COMPILE_SIZES`` before the first job. After the warm-up nothing compiles
while a job waits: a shape nobody warmed up (an odd size, an upscale tile) runs
uncompiled (:meth:`WarmShapes.stance`), and :func:`eager_runs` counts those for the metrics.

Compiling a size is slow the first time (on an H200, SD 1.5's twelve graphs for two
sizes took over five minutes), so the compiled kernels are kept in the data folder
(:func:`keep_compiled_kernels`) and a restart reuses them: on the tiny model on a CPU,
the same warm-up took 490 s with an empty cache and 69 s with the last run's.
(``dynamic=True``, one graph for every size, was tried and dropped: on the CPU it still
compiled 11 graphs, took longer to warm up, and ran 1.6 times slower.)
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from generation.loading import Pipeline
from storage.errors import ConfigError

log = logging.getLogger(__name__)

# dynamo falls back to eager for a function after this many graphs; every warmed-up
# size is one graph, so the default of 8 would be used up by the --ar choices alone.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompilePlan:
    enabled: bool
    reason: str  # the sentence the log and ``imagine doctor`` show
    cache_dir: Path | None = None  # compiled kernels kept here across restarts


def plan_compile(
    setting: str, device: torch.device, offload: str = "none", cache_dir: Path | None = None
) -> CompilePlan:
    """What ``IMAGINE_COMPILE`` means on ``device`` (with ``IMAGINE_OFFLOAD``); compiled
    kernels are kept in ``cache_dir`` when given."""
    if setting == "off":
        return CompilePlan(False, "off (IMAGINE_COMPILE=off)")
    if offload == "sequential":  # weights arrive layer by layer through hooks on every call
        if setting == "on":
            raise ConfigError(
                "IMAGINE_COMPILE=on cannot compile a model under IMAGINE_OFFLOAD=sequential, "
                "which moves every layer's weights on each call; use IMAGINE_OFFLOAD=model "
                "or IMAGINE_COMPILE=auto."
            )
        return CompilePlan(False, "off: IMAGINE_OFFLOAD=sequential moves weights every layer")
    if setting == "auto" and device.type != "cuda":
        return CompilePlan(
            False,
            f"off: auto compiles only on CUDA and this worker runs on {device.type} "
            "(IMAGINE_COMPILE=on forces it)",
        )
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            raise ConfigError(
                f"IMAGINE_COMPILE=on on the CPU needs a C++ compiler and {compiler!r} is not "
                "installed; install g++ (apt install g++) or set IMAGINE_COMPILE=off."
            )
    note = " (experimental on MPS)" if device.type == "mps" else ""
    return CompilePlan(
        True, f"on: denoiser and VAE decoder compiled for {device.type}{note}", cache_dir
    )


def keep_compiled_kernels(folder: Path) -> Path:
    """Inductor's caches (compiled graphs, generated kernels, Triton's binaries) in
    ``folder`` rather than in /tmp, which a container loses at every restart; an
    explicit ``TORCHINDUCTOR_CACHE_DIR`` wins. Returns the folder in use."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    chosen = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def compile_pipeline(pipe: Pipeline, *, fuse_qkv: bool, cache_dir: Path | None = None) -> None:
    """Compile ``pipe``'s denoiser and VAE decoder in place (the modules stay the same
    objects, so LoRA hot-swapping and ``from_pipe`` siblings see the compiled ones);
    the kernels are kept in ``cache_dir`` when given."""
    if cache_dir is not None:
        keep_compiled_kernels(cache_dir)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    if fuse_qkv:
        # Fused projections bypass to_q/to_k/to_v, and with them any LoRA on those.
        for model in (denoiser, pipe.vae):
            if hasattr(model, "fuse_qkv_projections"):
                model.fuse_qkv_projections()
    if getattr(pipe, "unet", None) is not None:
        denoiser.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
    )
    denoiser.compile(dynamic=False)
    pipe.vae.decoder.compile(dynamic=False)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (each new shape or guard failure is one)."""
    return int(counters["stats"]["unique_graphs"])


_graphs_after_warm_up: int | None = None


def mark_warm() -> None:
    """Called when the warm-up is over: later graphs count as recompilations."""
    global _graphs_after_warm_up
    _graphs_after_warm_up = compiled_graphs()


def recompilations() -> int:
    """Graphs compiled since the warm-up ended: shapes or paths nobody warmed up."""
    if _graphs_after_warm_up is None:
        return 0
    return compiled_graphs() - _graphs_after_warm_up


# After the warm-up, a warmed-up shape whose guards fail for a reason nobody foresaw runs
# eagerly rather than compile while a job waits; the tests set "fail_on_recompile" to
# prove that no such reason exists on the paths they cover.
STANCE_AFTER_WARM_UP = "eager_on_recompile"


@dataclass(frozen=True)
class Shape:
    """What one compiled graph of the denoiser is for: its input's size, its batch of
    images, and the rank of the style slots when they are on (0 when off: slots that grew
    after the warm-up no longer fit its graph)."""

    width: int
    height: int
    images: int
    slot_rank: int

    @property
    def styled(self) -> bool:
        return self.slot_rank > 0


class WarmShapes:
    """The shapes the warm-up compiled; the stance each later denoising call runs under."""

    def __init__(self) -> None:
        self.shapes: set[Shape] = set()
        self.warming = False
        self.warm = False

    @contextmanager
    def warming_up(self) -> Iterator[None]:
        self.warming = True
        try:
            yield
        finally:
            self.warming = False
            self.warm = True
            mark_warm()

    @contextmanager
    def stance(self, shape: Shape) -> Iterator[None]:
        """Compile freely before and during the warm-up; afterwards run the warmed-up
        shapes compiled and every other one eagerly (counted and logged once)."""
        if self.warming or not self.warm:
            yield
            if self.warming:
                self.shapes.add(shape)
            return
        if shape in self.shapes:
            with torch.compiler.set_stance(STANCE_AFTER_WARM_UP):
                yield
            return
        global _eager_runs
        _eager_runs += 1
        if shape not in _told:
            _told.add(shape)
            log.info(
                "%dx%d, %d image(s)%s runs uncompiled: the warm-up did not cover it "
                "(IMAGINE_COMPILE_SIZES names the --ar ratios it covers)",
                shape.width,
                shape.height,
                shape.images,
                " with styles" if shape.styled else "",
            )
        with torch.compiler.set_stance("force_eager"):
            yield


_eager_runs = 0
_told: set[Shape] = set()


def eager_runs() -> int:
    """Denoising calls since the warm-up whose shape it did not cover, run uncompiled."""
    return _eager_runs
