"""The unreduced logits shared between workers through files: computed once, loaded after."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import pytest
import torch

from reducers.prefix import embed, tokens_entering
from search import worker
from search.models import model_spec
from search.shared_logits import cache_path, drop_images, drop_tokens, shared_outputs, wait_for_tokens
from search.worker import _CONTEXTS, WorkerSetup, confirm_context, context
from spaces.search_space import SearchSpace

FAST = "tokensched_vit_shapes"  # random weights


def _space() -> SearchSpace:
    return SearchSpace("per-layer", model_spec(FAST))


def _logits(jobs) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [logits for logits, _ in shared_outputs(jobs)]


def _never() -> torch.Tensor:
    raise AssertionError("computed again")


def test_each_set_is_computed_once_then_loaded(tmp_path: Path) -> None:
    a, b = cache_path(tmp_path, "screen", ("m", 1)), cache_path(tmp_path, "confirm", ("m", 1))
    assert a != b and cache_path(tmp_path, "screen", ("m", 2)) != a
    first = _logits([(a, lambda: torch.ones(3, 2)), (b, lambda: torch.zeros(4, 2))])
    again = _logits([(a, _never), (b, _never)])
    for x, y in zip(first, again, strict=True):
        torch.testing.assert_close(x, y)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lock", ".lock", ".pt", ".pt"]  # no temporary left


def test_a_set_another_worker_holds_is_waited_for_while_the_next_is_computed(tmp_path: Path) -> None:
    held, screen = cache_path(tmp_path, "screen", ("m",)), cache_path(tmp_path, "confirm", ("m",))
    locked, computed_while_held = threading.Event(), threading.Event()

    def other_worker() -> None:  # holds the screening set's lock, then writes it
        with open(held.with_suffix(".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            locked.set()
            computed_while_held.wait(timeout=30)
            torch.save(torch.full((2, 2), 7.0), held)
            fcntl.flock(handle, fcntl.LOCK_UN)

    thread = threading.Thread(target=other_worker)
    thread.start()
    assert locked.wait(timeout=30)

    def compute_confirm() -> torch.Tensor:
        computed_while_held.set()
        return torch.zeros(2, 2)

    got = _logits([(held, _never), (screen, compute_confirm)])
    thread.join()
    torch.testing.assert_close(got[0], torch.full((2, 2), 7.0))
    torch.testing.assert_close(got[1], torch.zeros(2, 2))


def test_workers_of_one_run_share_the_reference_logits_and_the_images(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    setup = WorkerSetup(space=_space(), model=FAST, num_images=16, batch_size=8, confirm_images=8,
                        cache_dir=str(tmp_path))
    first = context(setup)
    files = sorted(p.name for p in tmp_path.glob("logits-*.pt"))
    assert len(files) == 2 and files[0].startswith("logits-confirm-") and files[1].startswith("logits-screen-")
    images = sorted(p.name for p in tmp_path.glob("images-*.pt"))  # the decoded sets, written beside them
    assert [name.removeprefix("images-") for name in images] == [name.removeprefix("logits-") for name in files]
    _CONTEXTS.clear()  # as a new worker process would start: it builds no image set
    with monkeypatch.context() as patched:
        patched.setattr(worker, "load_eval_set", lambda *a, **k: _never())
        patched.setattr(worker, "load_confirm_set", lambda *a, **k: _never())
        second = context(setup)
        confirm_data, _ = confirm_context(setup)
    torch.testing.assert_close(second.reference, first.reference)
    assert second.confirm_reference is not None and second.confirm_reference.shape[0] == 8
    assert torch.equal(second.data.images, first.data.images) and torch.equal(second.data.labels, first.data.labels)
    assert (second.data.mean, second.data.std, second.data.source) == (first.data.mean, first.data.std, first.data.source)
    assert torch.equal(confirm_data.images, first.confirm_data.images) and len(confirm_data) == 8
    assert not torch.equal(confirm_data.images, second.data.images[:8])  # another set
    _CONTEXTS.clear()
    drop_images(tmp_path)  # gone (the driver drops them after the last stage): built again
    third = context(setup)
    assert torch.equal(third.data.images, first.data.images) and not list(tmp_path.glob("images-*"))
    _CONTEXTS.clear()


def test_the_pass_that_computes_the_logits_keeps_the_tokens_every_worker_then_maps(tmp_path: Path) -> None:
    setup = WorkerSetup(space=_space(), model=FAST, num_images=16, batch_size=8, confirm_images=8,
                        cache_dir=str(tmp_path))
    first = context(setup)
    depth = len(first.model.blocks)
    assert sorted(first.prefix.shared) == list(range(1, depth))  # in memory: the files come in the background
    wait_for_tokens()
    assert len(list(tmp_path.glob("tokens-screen-*-block*.pt"))) == depth - 1  # the whole budget is 1 GiB here
    assert len(list(tmp_path.glob("tokens-confirm-*-block*.pt"))) == depth - 1
    x = torch.cat([b for b, _ in first.data.batches(8)])
    with torch.inference_mode():
        expected = tokens_entering(first.model, embed(first.model, x), 0, 5)
    assert torch.equal(first.prefix.shared[5], expected)  # the same forward, batch by batch: equal bits
    _CONTEXTS.clear()  # a new worker: the tokens come from the files, and nothing is recomputed
    second = context(setup)
    assert torch.equal(second.prefix.shared[5], expected) and second.prefix.start(5)[0] == 5
    assert second.prefix.computed_blocks == 0
    data, _ = confirm_context(setup)
    assert sorted(second.confirm_prefix.shared) == list(range(1, depth)) and len(data) == 8
    drop_tokens(tmp_path)
    assert not list(tmp_path.glob("tokens-*")) and len(list(tmp_path.glob("logits-*.pt"))) == 2
    _CONTEXTS.clear()
    third = context(setup)  # the logits are still there, the tokens not: the worker computes its own
    assert third.prefix.shared == {} and third.prefix.tokens(5) is not None and third.prefix.computed_blocks == 5
    _CONTEXTS.clear()


@pytest.mark.parametrize("budget", [0, 64])
def test_prefix_cache_budget_of_the_worker(tmp_path: Path, budget: int) -> None:
    setup = WorkerSetup(space=_space(), model=FAST, num_images=16, batch_size=8, confirm_images=8,
                        prefix_cache_mb=budget)
    ctx = context(setup)
    assert (ctx.prefix.tokens(3) is None) == (budget == 0)
    _CONTEXTS.clear()


def test_kept_tokens_that_cannot_be_written_leave_the_logits_and_no_half_file(tmp_path: Path, monkeypatch,
                                                                              capsys) -> None:
    from search import shared_logits as module

    real_save = torch.save

    def full_disk(obj, path) -> None:  # type: ignore[no-untyped-def]
        if Path(path).name.startswith("tokens-"):
            Path(path).write_bytes(b"half")
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(module.torch, "save", full_disk)
    path = cache_path(tmp_path, "screen", ("m",))
    (logits, kept), = module.shared_outputs([(path, lambda: (torch.ones(3, 2), {1: torch.zeros(3, 4, 2)}))])
    wait_for_tokens()
    assert torch.equal(logits, torch.ones(3, 2)) and set(kept) == {1}  # this worker keeps its own in memory
    assert path.is_file() and not list(tmp_path.glob("tokens-*"))
    assert "kept tokens not written" in capsys.readouterr().err
