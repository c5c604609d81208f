"""Image-by-image comparison of two confirmed schedules (search.paired) and its place in the verdict."""

from __future__ import annotations

import math

import pytest
import torch

from search import paired
from search.pareto import OBJECTIVES
from search.report import preset_verdicts

ACC_GMACS = [OBJECTIVES["accuracy"], OBJECTIVES["gmacs"]]


def test_hits_round_trip_through_hex() -> None:
    hits = torch.tensor([True, False, True, True, False, False, True, False, True, True, False])  # not a multiple of 8
    text = paired.encode(hits)
    assert len(text) == 4  # two bytes
    assert paired.decode(text, len(hits)).tolist() == hits.tolist()


def test_mcnemar_known_values() -> None:
    assert paired.mcnemar_p(0, 0) == 1.0
    assert paired.mcnemar_p(4, 4) == 1.0  # an even split
    assert paired.mcnemar_p(8, 4) == pytest.approx(2 * sum(math.comb(12, i) for i in range(5)) / 2**12)  # 0.388
    assert paired.mcnemar_p(8, 4) == paired.mcnemar_p(4, 8)
    assert paired.mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
    assert paired.mcnemar_p(30, 10) < 0.01 < paired.mcnemar_p(8, 4)


def _record(hits: list[bool], **extra) -> dict:
    return {"num_images": len(hits), paired.KEY: paired.encode(torch.tensor(hits)), **extra}


def test_compare_counts_the_images_each_gets_right_alone() -> None:
    a = _record([True, True, True, False, True, False])
    b = _record([True, False, False, True, True, False])
    assert paired.compare(a, b) == (2, 1, 1.0)
    assert paired.compare(a, {"num_images": 6}) is None  # no hits: nothing to compare
    assert paired.compare(a, _record([True] * 5)) is None  # other images


def test_a_preset_not_beaten_names_the_split_of_the_images() -> None:
    preset_hits = [True] * 95 + [False] * 5
    searched_hits = [False] * 3 + [True] * 93 + [False] * 4  # wrong on 3 images the preset gets, right on 1 it misses
    preset = _record(preset_hits, preset="p", accuracy=0.95, gmacs=0.5, feasible=True)
    searched = _record(searched_hits, trial=7, accuracy=0.93, gmacs=0.3, feasible=True)
    [(_, note)] = preset_verdicts([], [preset], ACC_GMACS, [searched])
    only_p, only_s, p = paired.compare(preset, searched)
    assert (only_p, only_s) == (3, 1)
    assert note == ("not beaten (best searched at no more cost: trial 7, accuracy 0.93 against 0.95; "
                    f"right on 3 images it misses, it on 1: McNemar p={p:.2g})")


def test_a_dominated_preset_says_by_how_much_and_a_sliver_of_gmacs_is_a_tie() -> None:
    """Equal accuracy at 0.02 % fewer GMACs (below report.COST_TIE) is a match, not a win; at 1 % fewer
    it dominates, and the verdict says by how much, with the split of the images."""
    preset = _record([True] * 95 + [False] * 5, preset="p", accuracy=0.95, gmacs=0.5, feasible=True)
    sliver = _record([True] * 94 + [False, True] + [False] * 4, trial=7, accuracy=0.95, gmacs=0.4999, feasible=True)
    cheaper = _record([True] * 94 + [False, True] + [False] * 4, trial=8, accuracy=0.95, gmacs=0.495, feasible=True)
    better = _record([True] * 97 + [False] * 3, trial=9, accuracy=0.97, gmacs=0.45, feasible=True)
    [(_, note)] = preset_verdicts([], [preset], ACC_GMACS, [sliver])
    assert note == "matched (not beaten) by search trial(s) 7"
    [(_, note)] = preset_verdicts([], [preset], ACC_GMACS, [sliver, cheaper])
    assert note == ("dominated by search trial(s) 8 (most accurate: trial 8, accuracy 0.95 against 0.95 at 1 % "
                    "fewer GMACs; right on 1 images it misses, it on 1: McNemar p=1)")
    [(_, note)] = preset_verdicts([], [preset], ACC_GMACS, [sliver, cheaper, better])
    assert note.startswith("dominated by search trial(s) 8, 9 (most accurate: trial 9, accuracy 0.97 against 0.95 at "
                           "10 % fewer GMACs; right on 0 images it misses, it on 2:")
