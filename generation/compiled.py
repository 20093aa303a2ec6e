"""``torch.compile`` of the denoiser and the VAE decoder: whether, how, and what it cost.

Shapes are static (``dynamic=False``): each image size and batch gets kernels of its
own, and the engine's warm-up compiles the sizes the ``--ar`` choices produce before
the first job. A shape nobody warmed up (an odd size, an upscale tile) compiles once
when first met; :func:`recompilations` counts those for the metrics.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters

from generation.loading import Pipeline
from storage.errors import ConfigError

# dynamo falls back to eager for a function after this many graphs; every warmed-up
# size is one graph, so the default of 8 would be used up by the --ar choices alone.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompilePlan:
    enabled: bool
    reason: str  # the sentence the log and ``imagine doctor`` show


def plan_compile(setting: str, device: torch.device, offload: str = "none") -> CompilePlan:
    """What ``IMAGINE_COMPILE`` means on ``device`` (with ``IMAGINE_OFFLOAD``)."""
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
    return CompilePlan(True, f"on: denoiser and VAE decoder compiled for {device.type}{note}")


def compile_pipeline(pipe: Pipeline, *, fuse_qkv: bool) -> None:
    """Compile ``pipe``'s denoiser and VAE decoder in place (the modules stay the same
    objects, so LoRA hot-swapping and ``from_pipe`` siblings see the compiled ones)."""
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
