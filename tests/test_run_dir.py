"""Reading a finished run back (the benches that re-evaluate a run's schedules)."""

from __future__ import annotations

from search.run_dir import model_args


def test_model_args_give_the_embedded_weights_unless_a_model_was_named() -> None:
    default = {"command": "python run_search.py --budget 65% --out runs/x", "model": "tokensched_vit_shapes",
               "pretrained": False, "checkpoint": None}
    assert model_args(default) == {"model": None, "pretrained": False, "checkpoint": None}  # load_model(None)
    named = {**default, "command": "python run_search.py --budget 65% --model tokensched_vit_shapes"}
    assert model_args(named) == {"model": "tokensched_vit_shapes", "pretrained": False, "checkpoint": None}
    deit = {**default, "command": "python run_search.py --model=deit_small_patch16_224 --pretrained",
            "model": "deit_small_patch16_224", "pretrained": True}
    assert model_args(deit)["pretrained"] is True
    weights = {**default, "checkpoint": "w.safetensors"}
    assert model_args(weights)["checkpoint"] == "w.safetensors"
