"""A reduced model under torch.compile (inductor): whether it can run here, its outputs against eager,
compile time, graph breaks and recompiles, and its speed-up compiled against the compiled unreduced
model (evaluate.py's protocol: warm-up, ABBA pairs, median of the ratios)."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reducers import apply_schedule, remove_schedule
from search.evaluate import time_call, timed_pairs
from spaces import Schedule


def compile_unavailable(device: str) -> str | None:
    """Why torch.compile (inductor) cannot run on `device` here, or None when it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    from torch import _dynamo

    if not _dynamo.is_dynamo_supported():
        import sys

        return f"torch.compile does not support Python {sys.version_info.major}.{sys.version_info.minor} in torch {torch.__version__}"
    if torch.device(device).type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "inductor compiles CUDA kernels with triton, which is not installed"
        return None
    from torch._inductor import config
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 - any failure to find a compiler is the reason
        return f"inductor compiles CPU kernels with a C++ compiler and none was found ({config.cpp.cxx}: {err})"
    return None


@dataclass(frozen=True)
class Compiled:
    max_abs_logit_diff: float  # compiled reduced model against the eager reduced model, same images
    compile_seconds: float  # first call of the compiled reduced model (tracing and code generation)
    baseline_compile_seconds: float
    graphs: int  # graphs dynamo captured for the reduced model (1: no graph break)
    graph_breaks: int
    recompiles: int  # compilations after the first call, over `batches` more batches of the same shape
    images_per_s: float
    baseline_images_per_s: float
    speedup: float  # median of the per-pair ratios, compiled against compiled
    eager_speedup: float  # the same pairs timed eagerly, for comparison
    batch_size: int
    repeats: int


def _counters() -> tuple[int, int]:
    """(graphs captured, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def _speed(base, cand, device: torch.device, repeats: int) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """Median seconds of each, and the median ratio, in ABBA pairs after one warm-up each."""
    base(), cand()
    b, c = timed_pairs(lambda: time_call(base, device), lambda: time_call(cand, device), repeats)
    return statistics.median(b), statistics.median(c), statistics.median(bi / ci for bi, ci in zip(b, c, strict=True))


@torch.inference_mode()
def compiled_run(model: nn.Module, schedule: Schedule, images: Tensor, *, batch_size: int = 64, repeats: int = 5,
                 batches: int = 3) -> Compiled:
    """Compile the unreduced model and a copy running `schedule`, check the reduced one's logits on
    `images` [B, 3, H, W] against eager, count graphs, breaks and recompiles over `batches` batches
    of other random images, and time both compiled (and eager) at `batch_size`. Dynamo is reset
    first: reduced models share their blocks' code, and dynamo stops compiling a function after a
    few models, so a process timing many schedules calls this once per schedule."""
    from torch import _dynamo

    device = next(model.parameters()).device
    base = copy.deepcopy(remove_schedule(model)).eval()
    reduced = apply_schedule(copy.deepcopy(base), schedule).eval()
    eager_logits = reduced(images)
    _dynamo.reset()
    graphs0, breaks0 = _counters()
    c_reduced = torch.compile(reduced)
    start = time.perf_counter()
    compiled_logits = c_reduced(images)
    compile_s = time.perf_counter() - start
    graphs1, breaks1 = _counters()
    x = torch.randn(batch_size, *images.shape[1:], device=device)
    c_reduced(x)  # a first call at another batch may compile once for the new shape
    graphs2, _ = _counters()
    for _ in range(batches):
        c_reduced(torch.randn_like(x))  # same shape, other images: any compilation now is per batch
    recompiles = _counters()[0] - graphs2
    c_base = torch.compile(base)
    start = time.perf_counter()
    c_base(x)
    base_compile_s = time.perf_counter() - start
    tb, tc, ratio = _speed(lambda: c_base(x), lambda: c_reduced(x), device, repeats)
    _, _, eager_ratio = _speed(lambda: base(x), lambda: reduced(x), device, repeats)
    return Compiled(max_abs_logit_diff=float((compiled_logits.float() - eager_logits.float()).abs().max()),
                    compile_seconds=compile_s, baseline_compile_seconds=base_compile_s, graphs=graphs1 - graphs0,
                    graph_breaks=breaks1 - breaks0, recompiles=recompiles, images_per_s=batch_size / tc,
                    baseline_images_per_s=batch_size / tb, speedup=ratio, eager_speedup=eager_ratio,
                    batch_size=batch_size, repeats=repeats)
