"""Shared contracts every pure reducer function in ``reducers`` passes: token counts, prefix tokens
kept first, size mass, the identity amount, gradients, and a ValueError for an impossible amount.

A new reduction method joins by adding its ``Case`` to ``CASES`` (docs/ARCHITECTURE.md); its own
rules get known-answer tests in tests/test_reducer_functions.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from reducers.adaptive import adaptive
from reducers.condense import condense
from reducers.diffrate import diffrate
from reducers.idle import select_active
from reducers.merge import merge
from reducers.prune import prune


@dataclass(frozen=True)
class Case:
    """A reducer under test: ``run(x, size, num_prefix, amount)`` and its documented count."""

    run: Callable[[Tensor, Tensor, int, int], tuple[Tensor, Tensor]]
    count: Callable[[int, int, int], int]  # (N, num_prefix, amount) -> output tokens
    identity_amount: Callable[[int], int]  # n -> amount that removes nothing
    preserves_mass: bool
    fused: bool  # every input row contributes to the output


def _signals(x: Tensor) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    b, n_total, _ = x.shape
    attn = torch.softmax(torch.randn(b, n_total, n_total, generator=gen, dtype=x.dtype) * 2, dim=-1)
    return {
        "attn": attn,
        "cls": attn[:, 0],
        "vnorm": torch.rand(b, n_total, generator=gen, dtype=x.dtype) + 0.5,
        "metric": torch.randn(b, n_total, 5, generator=gen, dtype=x.dtype),
    }


def _adaptive_run(threshold: float) -> Callable[[Tensor, Tensor, int, int], tuple[Tensor, Tensor]]:
    def run(x: Tensor, size: Tensor, p: int, r: int) -> tuple[Tensor, Tensor]:
        s = _signals(x)
        out, out_size, _ = adaptive(
            x, size, s["cls"], s["vnorm"], s["metric"], num_prefix=p, r=r, threshold=threshold
        )
        return out, out_size

    return run


CASES: dict[str, Case] = {
    "prune": Case(
        lambda x, s, p, k: prune(x, s, _signals(x)["cls"], num_prefix=p, keep=k, fuse=False),
        lambda n_total, p, k: p + k,
        lambda n: n,
        preserves_mass=False,
        fused=False,
    ),
    "prune_fuse": Case(
        lambda x, s, p, k: prune(x, s, _signals(x)["cls"], num_prefix=p, keep=k, fuse=True),
        lambda n_total, p, k: p + k + 1,
        lambda n: n,
        preserves_mass=True,
        fused=True,
    ),
    "merge": Case(
        lambda x, s, p, r: merge(x, s, _signals(x)["metric"], num_prefix=p, r=r),
        lambda n_total, p, r: n_total - r,
        lambda n: 0,
        preserves_mass=True,
        fused=True,
    ),
    "condense_size": Case(
        lambda x, s, p, k: condense(
            x, s, _signals(x)["attn"], num_prefix=p, keep=k, order=2, alpha=0.5, weighting="size"
        ),
        lambda n_total, p, k: p + k,
        lambda n: n,
        preserves_mass=True,
        fused=True,
    ),
    "condense_size_relevance": Case(
        lambda x, s, p, k: condense(
            x, s, _signals(x)["attn"], num_prefix=p, keep=k, order=3, alpha=0.3, weighting="size_relevance"
        ),
        lambda n_total, p, k: p + k,
        lambda n: n,
        preserves_mass=True,
        fused=True,
    ),
    "diffrate_merge": Case(
        lambda x, s, p, k: diffrate(x, s, _signals(x)["cls"], num_prefix=p, prune_to=x.shape[1] - p, merge_to=k),
        lambda n_total, p, k: p + k,
        lambda n: n,
        preserves_mass=False,  # sizes add source size x similarity
        fused=True,
    ),
    "diffrate_prune": Case(
        lambda x, s, p, k: diffrate(x, s, _signals(x)["cls"], num_prefix=p, prune_to=k, merge_to=k),
        lambda n_total, p, k: p + k,
        lambda n: n,
        preserves_mass=False,
        fused=False,
    ),
    "adaptive_merge": Case(
        _adaptive_run(float("inf")),
        lambda n_total, p, r: n_total - r,
        lambda n: 0,
        preserves_mass=True,
        fused=True,
    ),
    "adaptive_prune": Case(
        _adaptive_run(-1.0),
        lambda n_total, p, r: n_total - r,
        lambda n: 0,
        preserves_mass=False,
        fused=False,
    ),
}


def _inputs(n_total: int, *, grad: bool = False) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, n_total, 4, generator=gen, dtype=torch.float64, requires_grad=grad)
    size = torch.randint(1, 4, (3, n_total, 1), generator=gen).to(torch.float64)
    return x, size


def _amount(name: str, n: int) -> int:
    """A removing amount: keep about half for keep-style reducers, r = n // 2 - 1 for r-style."""
    return n // 2 - 1 if name.startswith(("merge", "adaptive")) else n // 2


@pytest.mark.parametrize("num_prefix", [1, 2])
@pytest.mark.parametrize("n_total", [9, 10])
@pytest.mark.parametrize("name", list(CASES))
def test_contract_counts_prefix_and_mass(name: str, n_total: int, num_prefix: int) -> None:
    case, n = CASES[name], n_total - num_prefix
    x, size = _inputs(n_total)
    amount = _amount(name, n)
    out, out_size = case.run(x, size, num_prefix, amount)
    count = case.count(n_total, num_prefix, amount)
    assert out.shape == (3, count, 4) and out_size.shape == (3, count, 1)
    assert torch.equal(out[:, :num_prefix], x[:, :num_prefix])
    assert torch.equal(out_size[:, :num_prefix], size[:, :num_prefix])
    assert bool((out_size >= 1).all()) and torch.isfinite(out).all()
    if case.preserves_mass:
        assert torch.allclose(out_size.sum(dim=(1, 2)), size.sum(dim=(1, 2)))


@pytest.mark.parametrize("num_prefix", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_contract_identity_when_nothing_removed(name: str, num_prefix: int) -> None:
    case = CASES[name]
    x, size = _inputs(9)
    out, out_size = case.run(x, size, num_prefix, case.identity_amount(9 - num_prefix))
    assert out is x and out_size is size


@pytest.mark.parametrize("name", list(CASES))
def test_contract_gradients_flow_through_kept_and_fused_tokens(name: str) -> None:
    case, num_prefix = CASES[name], 1
    x, size = _inputs(9, grad=True)
    out, _ = case.run(x, size, num_prefix, _amount(name, 8))
    out.sum().backward()
    assert x.grad is not None
    touched = (x.grad != 0).any(dim=-1)  # (B, N) rows that reach the output
    assert bool(touched[:, :num_prefix].all())
    expected = 9 if case.fused else case.count(9, num_prefix, _amount(name, 8))
    assert touched.sum(dim=1).tolist() == [expected] * 3


@pytest.mark.parametrize(
    "call",
    [
        lambda x, s, g: merge(x, s, g["metric"], num_prefix=1, r=5),  # n // 2 = 4
        lambda x, s, g: merge(x, s, g["metric"], num_prefix=1, r=-1),
        lambda x, s, g: adaptive(x, s, g["cls"], g["vnorm"], g["metric"], num_prefix=1, r=5, threshold=0.0),
        lambda x, s, g: prune(x, s, g["cls"], num_prefix=1, keep=0, fuse=True),
        lambda x, s, g: prune(x, s, g["cls"], num_prefix=1, keep=9, fuse=False),
        lambda x, s, g: condense(x, s, g["attn"], num_prefix=1, keep=0, order=1, alpha=0.5, weighting="size"),
        lambda x, s, g: condense(x, s, g["attn"], num_prefix=1, keep=2, order=1, alpha=1.5, weighting="size"),
        lambda x, s, g: select_active(g["cls"], num_prefix=1, keep=9),
        lambda x, s, g: diffrate(x, s, g["cls"], num_prefix=1, prune_to=9, merge_to=4),
        lambda x, s, g: diffrate(x, s, g["cls"], num_prefix=1, prune_to=4, merge_to=5),
        lambda x, s, g: diffrate(x, s, g["cls"], num_prefix=1, prune_to=4, merge_to=0),
    ],
)
def test_bad_amounts_raise_value_error(call: Callable[[Tensor, Tensor, dict[str, Tensor]], object]) -> None:
    x, size = _inputs(9)
    with pytest.raises(ValueError):
        call(x, size, _signals(x))
