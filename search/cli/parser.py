"""The command line's argparse parser: subcommands, their flags, and the types that check them."""

from __future__ import annotations

import argparse
import sys

from search.cli.checks import EXIT_BAD_INPUT, cuda_available


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input in one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help="a paper's schedule: tome:13, tome:13,-1, evit:0.7, idlevit:0.7, ppt, tcvit:0.7, none")
    group.add_argument("--schedule", help="a schedule file (YAML or JSON)")


def build_parser(prog: str = "run_search.py") -> argparse.ArgumentParser:
    from search.models import DEFAULT_MODEL

    parser = _Parser(prog=prog, description="Search token-reduction schedules for timm ViTs.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    g = sub.add_parser("gmacs", help="GMACs and tokens per block of a schedule (no weights needed)")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default: {DEFAULT_MODEL})")
    _add_schedule_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object")

    e = sub.add_parser("eval", help="accuracy, agreement, GMACs and measured speed-up of one schedule")
    _add_model_args(e)
    _add_schedule_args(e)
    e.add_argument("--num-images", type=_positive_int, default=2000, help="screening subset size (default 2000)")
    e.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="evaluation batch, or auto (default): 64 on CPU, 256 on CUDA")
    e.add_argument("--timing-batch", type=_positive_int, default=64, help="throughput batch (default 64)")
    e.add_argument("--repeats", type=_positive_int, default=5, help="timed repeats, median reported (default 5)")
    e.add_argument("--no-timing", action="store_true", help="skip the throughput measurement")
    e.add_argument("--amp", action="store_true", help="time under autocast (bf16 on CPU, fp16 on CUDA)")
    e.add_argument("--compile", action="store_true",
                   help="also run the reduced and the unreduced model under torch.compile (inductor): outputs "
                        "against eager, compile time, graph breaks and recompiles, compiled speed-up")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("search", help="search schedules under a budget (the default command)")
    _add_search_args(s)

    f = sub.add_parser("finetune", help="fine-tune an exported config: distillation + token cut loss (IdleViT recipe)")
    _add_finetune_args(f)

    pr = sub.add_parser("profile", help="time every block kind of a model: the latency profile the search predicts with")
    pr.add_argument("--model", default=None, help="timm model name (default: the embedded default)")
    pr.add_argument("--device", default="cuda" if cuda_available() else "cpu", help="cpu or cuda (default: cuda when present)")
    pr.add_argument("--timing-batch", type=_positive_int, default=64, help="batch (default 64, the search's)")
    pr.add_argument("--threads", type=_positive_int, default=1,
                    help="torch threads (default 1: a search trial's, --cpus-per-trial 1)")
    pr.add_argument("--out", default=None, help="profile file to write (default: the cache the search reads)")
    pr.add_argument("--rebuild", action="store_true", help="time it again even when a matching profile is cached")
    pr.add_argument("--json", action="store_true", help="print one JSON object")

    d = sub.add_parser("make-data", help="write the embedded data set as an ImageFolder of PNGs (to try --data)")
    d.add_argument("out", help="directory to create (must not exist or be empty)")
    d.add_argument("--split", choices=("heldout", "train"), default="heldout", help="which split (default heldout)")
    d.add_argument("--num-images", type=_positive_int, default=2000, help="images to write (default 2000)")
    d.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    return parser


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    from search.data import TIMM_CROP_SCALE

    p.add_argument("--config", required=True, help="an exported config: runs/<run>/configs/<id>.yaml")
    p.add_argument("--model", default=None, help="timm model name (default: the model the config was searched on)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs network or cache)")
    p.add_argument("--checkpoint", default=None, help="local weights (default: the config's source checkpoint)")
    p.add_argument("--data", default=None,
                   help="training images: an ImageFolder or flat directory (default: the embedded training stream)")
    p.add_argument("--eval-data", default=None,
                   help="held-out images scored before and after (default: the config's search data, else the "
                        "embedded held-out set)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None, help="optimiser steps")
    length.add_argument("--epochs", type=_positive_int, default=None,
                        help="passes over --data (the embedded stream: 10,000 images per epoch); default 30 "
                             "(IdleViT's recipe) when neither --steps nor --epochs is given")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per step and process (default 64)")
    p.add_argument("--crop-scale", type=_crop_scale, default=TIMM_CROP_SCALE,
                   help=f"smallest image area of the random-resized crop on --data (default {TIMM_CROP_SCALE}, "
                        "timm's; 1.0 for the embedded set, whose label sits in small objects)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, cosine to 1%% of it (default 1e-4)")
    p.add_argument("--alpha", type=float, default=5.0, help="weight of the distillation KL (default 5)")
    p.add_argument("--beta", type=float, default=500.0, help="weight of the feature MSE (default 500)")
    p.add_argument("--theta", type=float, default=20.0, help="weight of the token cut loss (default 20)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default 0: before and after)")
    p.add_argument("--out", default=None, help="output directory (default: <config dir>/../finetune/<config name>)")
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--num-images", type=_positive_int, default=2000, help="held-out images scored (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training stream and dropout (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    from search.data import TIMM_CROP_SCALE
    from search.pareto import OBJECTIVES
    from search.run_dir import SAMPLERS
    from spaces.search_space import REDUCING, SPACES

    _add_model_args(p)
    p.add_argument("--budget", required=True, help="GMACs budget: 3.0GMACs, '3.0 GMACs', 65%% (of the unreduced model) or 0.65x")
    p.add_argument("--space", default="per-layer", help=f"search space: {', '.join(SPACES)} (default per-layer)")
    p.add_argument("--methods", default=None, help=f"methods to choose from (default {','.join(REDUCING)}; for a model "
                   "without a class token, merge)")
    p.add_argument("--sampler", default="local-nsga2",
                   help=f"Optuna sampler: {', '.join(SAMPLERS)} (default local-nsga2: half the trials move a point of "
                        "the front, presets included, the other half NSGA-II's)")
    p.add_argument("--objectives", default="accuracy,gmacs,predicted_speedup",
                   help=f"objectives, comma-separated from {', '.join(OBJECTIVES)} (default accuracy,gmacs,"
                        "predicted_speedup: the speed-up the run's latency profile predicts; speedup and "
                        "images_per_s time every trial)")
    p.add_argument("--trials", type=_positive_int, default=60,
                   help="searched trials (default 60); every preset in range is evaluated besides them")
    p.add_argument("--out", default=None, help="run directory (default runs/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--storage", default=None, help="Optuna storage (default: the journal file study.log in --out; sqlite:///PATH, postgresql://..., journal:PATH)")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local Ray)")
    p.add_argument("--cpus-per-trial", type=_positive_float, default=1.0, help="CPUs per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=_non_negative_float, default=0.0, help="GPUs per trial (default 0)")
    p.add_argument("--concurrency", type=_positive_int, default=2, help="trials at once (default 2)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="the same seed gives the same trials and verdict in every run (default): the sampler is told "
                        "results in suggestion order, suggestion k seeing those of suggestions 0..k-2*concurrency "
                        "only, and presets stop early only against presets of their own batch; --no-deterministic: "
                        "each result as soon as Ray has it, and presets stop against every preset screened so far")
    p.add_argument("--num-images", type=_positive_int, default=2000, help="screening subset size (default 2000)")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="evaluation batch, or auto (default): 64 on CPU, 256 on CUDA")
    p.add_argument("--timing-batch", type=_positive_int, default=64,
                   help="throughput batch: of the latency profile and the re-timing (default 64)")
    p.add_argument("--latency-batch", type=_positive_int, default=1,
                   help="batch at which the front and the presets are also re-timed for latency (default 1)")
    p.add_argument("--latency-profile", default=None,
                   help="a latency profile file (run_search.py profile --out FILE); it must have been measured "
                        "for this model, device, torch, dtype, --timing-batch and threads (default: the cached one "
                        "that matches, else one built at the start)")
    p.add_argument("--no-retime", action="store_true",
                   help="do not re-time the front and the presets after the confirmation")
    p.add_argument("--compile", action="store_true",
                   help="also re-time the front and the presets under torch.compile (inductor), against the compiled "
                        "unreduced model, outputs checked against eager (each schedule compiles first: minutes on a CPU)")
    p.add_argument("--no-presets", action="store_true", help="do not evaluate the paper presets")
    p.add_argument("--confirm-images", type=_positive_int, default=2000,
                   help="images disjoint from the screening set on which the front and the presets are re-scored "
                        "(default 2000)")
    p.add_argument("--stop-chunk", type=_non_negative_int, default=250,
                   help="screen each searched trial in chunks of this many images and stop it once a 95%% upper "
                        "bound of its accuracy falls below the best accuracy measured at no more GMACs "
                        "(default 250; 0: always screen every image)")
    p.add_argument("--screen-precision", choices=("fp32", "bf16"), default="fp32",
                   help="screening forwards in fp32 or under bf16 autocast (on a GPU); the confirmation and the "
                        "reference logits stay fp32 (default fp32)")
    p.add_argument("--prefix-cache-mb", type=_non_negative_int, default=1024,
                   help="memory per image set for the unreduced model's tokens entering its blocks, kept by the run "
                        "(shared by its workers through files) and by each worker, so that a schedule that reduces "
                        "nothing before block k starts there (default 1024; 0: off)")
    p.add_argument("--min-gmacs", default=None,
                   help="the cheapest the front should reach, like --budget (default: the cheapest preset under the budget)")
    p.add_argument("--finetune-top", type=_non_negative_int, default=0,
                   help="after screening, fine-tune this many of the most promising candidates (default 0)")
    p.add_argument("--finetune-steps", type=_positive_int, default=100, help="steps of each short fine-tune (default 100)")
    p.add_argument("--finetune-batch", type=_positive_int, default=32, help="batch of the short fine-tunes (default 32)")
    p.add_argument("--finetune-lr", type=float, default=3e-4, help="peak learning rate of the short fine-tunes (default 3e-4)")
    p.add_argument("--finetune-crop-scale", type=_crop_scale, default=TIMM_CROP_SCALE,
                   help=f"smallest image area of the random-resized crop on --finetune-data (default {TIMM_CROP_SCALE}, timm's)")
    p.add_argument("--finetune-data", default=None,
                   help="training images for the short fine-tunes (needed with --data; default: the embedded training stream)")
    p.add_argument("--trial-timeout", type=_positive_float, default=None,
                   help="seconds a screening trial may run; a longer one ends its worker and is recorded as FAIL "
                        "(default: no limit)")
    p.add_argument("--finetune-timeout", type=_positive_float, default=None,
                   help="seconds a short fine-tune may run; a longer one ends its worker and is recorded as FAIL "
                        "(default: no limit)")
    p.add_argument("--retries", type=_non_negative_int, default=0,
                   help="times a failed or killed trial is run again (Ray's FailureConfig; default 0)")
    p.add_argument("--fail-trials", default="", help=argparse.SUPPRESS)  # test hook: "3:raise,5:nan"
    p.add_argument("--fail-finetunes", default="", help=argparse.SUPPRESS)  # test hook: "0:raise,1:hang"


def _int_at_least(minimum: int):  # type: ignore[no-untyped-def]
    """An argparse type: an integer >= minimum ("must be positive" for 1)."""
    bound = "positive" if minimum == 1 else f">= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _batch_size(text: str) -> int | str:
    """argparse type: a positive integer, or "auto" (search.evaluate.eval_batch_size picks per device)."""
    return "auto" if text == "auto" else _positive_int(text)


def _float_above(minimum: float, *, inclusive: bool):  # type: ignore[no-untyped-def]
    """An argparse type: a finite number > minimum (>= with inclusive)."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum:g}, got {text}")
        return value

    return parse


_positive_float, _non_negative_float = _float_above(0.0, inclusive=False), _float_above(0.0, inclusive=True)


def _crop_scale(text: str) -> float:
    """argparse type: a share of the image area in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="timm model name (default: the embedded default with its weights)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs network or cache)")
    p.add_argument("--checkpoint", default=None, help="local weights (.safetensors or .pth)")
    p.add_argument("--data", default=None, help="ImageFolder / ImageNet-val directory (default: the embedded held-out set)")
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the screening subset (default 0)")
