"""Model loading: a model without weights is the same model in every process."""

from __future__ import annotations

import subprocess
import sys

import torch

from search.models import load_model

_DIGEST = """
import hashlib, sys, torch
from search.models import load_model
torch.manual_seed(int(sys.argv[1]))  # the caller's random state must not matter
model = load_model("vit_tiny_patch16_224")
digest = hashlib.sha256()
for tensor in model.state_dict().values():
    digest.update(tensor.numpy().tobytes())
print(digest.hexdigest())
"""


def _digest_in_new_process(seed: int) -> str:
    done = subprocess.run([sys.executable, "-c", _DIGEST, str(seed)], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_random_weights_are_the_same_in_every_process() -> None:
    """Ray workers build the model themselves: without weights they must all build the one that
    computed the shared unreduced logits, or agreement and the confirmation are meaningless."""
    assert _digest_in_new_process(1) == _digest_in_new_process(2)


def test_random_init_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    first = load_model("vit_tiny_patch16_224")
    assert torch.equal(torch.rand(4), expected)
    second = load_model("vit_tiny_patch16_224")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True))
