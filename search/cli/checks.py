"""Input checks at the command line's boundary: each raises ValueError with one line that names
the flag, before Ray starts or anything is written."""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_device(device: str) -> None:
    """--device must name a device torch knows and that this machine has (ValueError otherwise)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r}: not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not cuda_available():
        raise ValueError(f"--device {device}: no CUDA device here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"--device {device}: not usable here ({str(err).splitlines()[0]})") from None


def check_out_dir(path, flag: str) -> None:  # type: ignore[no-untyped-def]
    """A directory to be created (or reused) at ``path`` must be creatable: no file in the way, a
    writable existing ancestor. Probed with a temporary directory that is removed at once."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a directory")
    if path.is_dir():
        return  # whether its content may be added to is the command's own check
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, not a directory")
    try:
        Path(tempfile.mkdtemp(dir=ancestor, prefix=".tokensched-probe-")).rmdir()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create a directory in {ancestor} ({err.strerror})") from None


def check_search_inputs(args: argparse.Namespace) -> None:
    """Make the search's paths absolute and check them (and --pretrained) before Ray starts.

    Ray Tune runs every trial in a working directory of its own, so a relative path would
    fail in each trial instead of once, here.
    """
    from pathlib import Path

    from search.data import required_images
    from search.models import DEFAULT_MODEL, create, load_model, read_checkpoint
    from search.run_dir import check_storage_url

    args.checkpoint, args.data, args.finetune_data = (str(Path(p).resolve()) if p else None
                                                      for p in (args.checkpoint, args.data, args.finetune_data))
    if args.checkpoint:
        read_checkpoint(args.checkpoint)
        load_model(args.model, checkpoint=args.checkpoint)  # another architecture's weights: one error now
    if args.data:
        items = required_images(Path(args.data))
        _check_decodable(items, "--data", args.data)
        # The confirmation images must fit beside the screening images (the embedded default draws
        # them from another seed of its held-out split).
        if args.num_images + args.confirm_images > len(items):
            raise ValueError(f"--confirm-images {args.confirm_images}: {args.data} holds {len(items)} images and "
                             f"{min(args.num_images, len(items))} are set aside for screening (--num-images)")
    if args.finetune_data:
        items = required_images(Path(args.finetune_data), what="--finetune-data directory")
        _check_decodable(items, "--finetune-data", args.finetune_data)
    if args.pretrained and not args.checkpoint:
        create(args.model or DEFAULT_MODEL, pretrained=True)  # offline: one error now, not one per trial
    _check_resources(args)
    if args.storage:
        check_storage_url(args.storage)
    if args.out and not args.resume:
        check_out_dir(args.out, "--out")


SAMPLE_IMAGES = 16  # decoded before Ray starts: enough to catch a folder of non-images


def _check_decodable(items: list[tuple[str, int]], flag: str, root: str) -> None:
    """A seeded sample of the images must decode (the workers would each fail on a folder of non-images)."""
    import random

    from PIL import Image

    sample = random.Random(0).sample(items, min(SAMPLE_IMAGES, len(items)))
    failures = []
    for path, _ in sample:
        try:
            with Image.open(path) as img:
                img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:
            failures.append((path, err))
    if len(failures) == len(sample):
        path, err = failures[0]
        raise ValueError(f"{flag} {root}: none of {len(sample)} sampled images could be decoded "
                         f"(e.g. {path}: {type(err).__name__})")
    if failures:
        print(f"warning: {flag} {root}: {len(failures)} of {len(sample)} sampled images could not be decoded",
              file=sys.stderr)


def _check_resources(args: argparse.Namespace) -> None:
    """Resources per trial must fit the local machine (Ray would wait forever for a GPU that is not
    there); on a --ray-address cluster the driver checks them against the cluster once connected."""
    import os

    import torch

    if args.ray_address:
        return
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    if args.cpus_per_trial > cpus:
        raise ValueError(f"--cpus-per-trial {args.cpus_per_trial:g}: this machine has {cpus} CPU(s)")
    if args.gpus_per_trial > gpus:
        raise ValueError(f"--gpus-per-trial {args.gpus_per_trial:g}: this machine has {gpus} GPU(s)")
    if args.gpus_per_trial > 0 and not str(args.device).startswith("cuda"):
        raise ValueError(f"--gpus-per-trial {args.gpus_per_trial:g} with --device {args.device}: "
                         "the trials would hold GPUs they do not use")
