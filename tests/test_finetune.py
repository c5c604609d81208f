"""Fine-tuning: the losses' known answers, gradients through every reducer, resume, data streams, the CLI,
and a short fine-tune that recovers accuracy an aggressive schedule lost (the embedded default)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from reducers import apply_schedule, last_forward_state
from reducers.losses import cut_loss_of, distillation_kl, feature_mse, token_cut_loss
from run_search import main
from search.data import NO_LABEL, FolderStream, embedded_set
from search.embedded import synthetic
from search.finetune import CHECKPOINT, FinetuneSettings, finetune, load_job, lr_at, train_stream
from search.models import DEFAULT_MODEL, data_config, load_model
from search.report import export_configs
from spaces import LayerPlan, ModelSpec, Schedule, gmacs
from tests.images import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: these tests are small, and two threads on two busy cores oversubscribe (about 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0, **kwargs) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    """A 4-block ViT on 32 px images with 8 px patches: 16 patch tokens + CLS (random weights)."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=5, **kwargs).eval()


def tiny_batches(step: int, labelled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(step))
    return x, torch.arange(4) % 5 if labelled else torch.full((4,), NO_LABEL)


def at(spec: ModelSpec, where: dict[int, LayerPlan], name: str = "test") -> Schedule:
    return Schedule(spec, tuple(where.get(i, LayerPlan()) for i in range(spec.depth)), name=name)


def quiet(_line: str) -> None:
    pass


# --- losses -----------------------------------------------------------------------------------

def test_token_cut_loss_known_answers() -> None:
    # 4 tokens, S = {0 (CLS), 1}, I = {2, 3}, K = 2.
    a4 = torch.tensor([[0.40, 0.30, 0.20, 0.10],
                       [0.10, 0.50, 0.25, 0.15],
                       [0.30, 0.20, 0.40, 0.10],
                       [0.25, 0.25, 0.25, 0.25]])  # fmt: skip
    # L_inter = (0.3^2 + 0.4^2) / 2 + (0.2^2 + 0.25^2) / 2 = 0.125 + 0.05125; L_intra = (0.3^2 + 0.4^2) / 2 = 0.125
    assert token_cut_loss(a4[None], torch.tensor([[0, 1]])).item() == pytest.approx(0.30125, abs=1e-6)
    # 5 tokens, S = {0, 2, 4}, I = {1, 3}: rows 2 and 3 never cross the cut.
    a5 = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2],
                       [0.1, 0.3, 0.2, 0.3, 0.1],
                       [0.5, 0.0, 0.5, 0.0, 0.0],
                       [0.0, 0.5, 0.0, 0.5, 0.0],
                       [0.1, 0.1, 0.1, 0.1, 0.6]])  # fmt: skip
    # L_inter = (0.4^2 + 0 + 0.2^2) / 3 + (0.3^2 + 0) / 2; L_intra = (0.4^2 + 0 + 0.2^2) / 3
    expected = 0.2 / 3 + 0.045 + 0.2 / 3
    assert token_cut_loss(a5[None], torch.tensor([[0, 2, 4]])).item() == pytest.approx(expected, abs=1e-6)
    # The batch mean, and the order of the active indices does not matter.
    both = token_cut_loss(torch.stack([a5, a5]), torch.tensor([[0, 2, 4], [4, 0, 2]]))
    assert both.item() == pytest.approx(expected, abs=1e-6)


def test_token_cut_loss_is_zero_across_a_clean_cut() -> None:
    # S = {0, 1, 2}, I = {3, 4}; idle rows may attend to CLS (j = 0 is left out of L_inter's second sum).
    a = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0],
                      [0.2, 0.6, 0.2, 0.0, 0.0],
                      [0.1, 0.1, 0.8, 0.0, 0.0],
                      [0.5, 0.0, 0.0, 0.3, 0.2],
                      [0.0, 0.0, 0.0, 0.4, 0.6]])  # fmt: skip
    assert token_cut_loss(a[None], torch.tensor([[0, 1, 2]])).item() == pytest.approx(0.0, abs=1e-7)
    assert cut_loss_of(None) is None and cut_loss_of([]) is None
    # Uniform 4x4, S = {0, 1}: (0.5^2 + 0.5^2) / 2 + (0.25^2 + 0.25^2) / 2 + (0.5^2 + 0.5^2) / 2; plus the clean cut.
    records = [(1, torch.tensor([[0, 1]]), torch.full((1, 4, 4), 0.25)), (2, torch.tensor([[0, 1, 2]]), a[None])]
    assert cut_loss_of(records).item() == pytest.approx(0.5625, abs=1e-6)


def test_distillation_kl_and_feature_mse() -> None:
    logits = torch.randn(3, 7)
    assert distillation_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_kl(logits, torch.randn(3, 7)).item() > 0
    # teacher (0.5, 0.5), student (0.75, 0.25): KL = 0.5 ln(4 / 3)
    kl = distillation_kl(torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2))
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert feature_mse(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2)).item() == pytest.approx(7.5)


# --- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"steps": 0}, {"steps": 2.5}, {"batch_size": 0}, {"lr": 0.0}, {"warmup_steps": 11},
                                 {"min_lr_ratio": 0.0}, {"label_smoothing": 1.0}, {"theta": -1.0},
                                 {"checkpoint_every": 0}, {"eval_every": -1}])
def test_settings_reject_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        FinetuneSettings(**{"steps": 10, **bad})


def test_lr_warms_up_then_decays_to_the_floor() -> None:
    assert FinetuneSettings(steps=100).warmup_steps == 10 and FinetuneSettings(steps=5000).warmup_steps == 50
    s = FinetuneSettings(steps=100, lr=1e-3, min_lr_ratio=0.01)
    lrs = [lr_at(i, s) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] == pytest.approx(1e-5)


# --- training steps through every reducer ------------------------------------------------------

METHODS = {
    "prune": LayerPlan("prune", keep=0.5, fuse=False),
    "prune-fused": LayerPlan("prune", keep=0.5, fuse=True),
    "merge": LayerPlan("merge", keep=0.5),
    "idle": LayerPlan("idle", keep=0.5),
    "condense": LayerPlan("condense", keep=0.5),
    "adaptive-prune": LayerPlan("adaptive", keep=0.5, threshold=0.0),
    "adaptive-merge": LayerPlan("adaptive", keep=0.5, threshold=1.0),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_one_step_reaches_every_block(method: str, tmp_path: Path) -> None:
    model = tiny()
    before = {i: b.attn.qkv.weight.detach().clone() for i, b in enumerate(model.blocks)}
    schedule = at(ModelSpec.from_model(model), {1: METHODS[method], 2: METHODS[method]})
    # Adam moves a weight iff its gradient is non-zero; theta 0: CE + KL + MSE alone must reach every block
    # (the cut loss would move the idle blocks' qkv by itself).
    settings = FinetuneSettings(steps=1, weight_decay=0.0, lr=1e-3, theta=0.0)
    m = finetune(model, schedule, tiny_batches, settings, out_dir=tmp_path / "ft", log=quiet)
    assert all(math.isfinite(m["history"][0][k]) for k in ("total", "ce", "kl", "mse", "cut"))
    assert m["history"][0]["kl"] > 0  # the schedule changed the logits
    for i, blk in enumerate(model.blocks):
        assert (blk.attn.qkv.weight - before[i]).abs().max() > 0, f"block {i} got no gradient"
    assert (m["history"][0]["cut"] > 0) == (method == "idle")


def test_idle_records_attention_and_the_cut_loss_trains_its_blocks() -> None:
    model = tiny().train()
    apply_schedule(model, at(ModelSpec.from_model(model), {1: LayerPlan("idle", keep=0.5), 2: LayerPlan("idle", keep=0.25)}))
    state = last_forward_state(model)
    state.record_idle_attention = True
    model(tiny_batches(0)[0])
    assert [(b, idx.shape[1]) for b, idx, _ in state.idle_attention] == [(1, 9), (2, 5)]  # CLS + active
    attn = state.idle_attention[0][2]
    assert attn.shape == (4, 17, 17) and torch.allclose(attn.sum(-1), torch.ones(4, 17), atol=1e-5)
    cut = cut_loss_of(state.idle_attention)
    assert cut.item() > 0
    cut.backward()
    for b in (0, 1, 2):  # the idle blocks, and the block feeding them
        assert model.blocks[b].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[3].attn.qkv.weight.grad is None
    state.record_idle_attention = False
    model(tiny_batches(0)[0])
    assert state.idle_attention == []


def test_unlabelled_batches_keep_only_distillation(tmp_path: Path) -> None:
    model = tiny()
    schedule = at(ModelSpec.from_model(model), {1: LayerPlan("prune", keep=0.25)})
    m = finetune(model, schedule, lambda s: tiny_batches(s, labelled=False), FinetuneSettings(steps=1),
                 out_dir=tmp_path / "ft", log=quiet)
    assert m["history"][0]["ce"] == 0.0 and m["history"][0]["kl"] > 0


# --- resume and outputs ---------------------------------------------------------------------------

def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    schedule = at(ModelSpec.from_model(tiny()), {1: LayerPlan("idle", keep=0.5), 2: LayerPlan("merge", keep=0.5)})
    settings = FinetuneSettings(steps=6, checkpoint_every=3, lr=1e-3)
    drop = {"drop_path_rate": 0.2}  # random per step: the resumed run must draw the same
    whole = finetune(tiny(**drop), schedule, tiny_batches, settings, out_dir=tmp_path / "whole", log=quiet)

    def interrupted(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step == 4:
            raise KeyboardInterrupt  # as if the job were stopped during step 4
        return tiny_batches(step)

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny(**drop), schedule, interrupted, settings, out_dir=tmp_path / "cut", log=quiet)
    assert (tmp_path / "cut" / CHECKPOINT).is_file() and not (tmp_path / "cut" / "model.safetensors").exists()
    lines: list[str] = []
    resumed = finetune(tiny(**drop), schedule, tiny_batches, settings, out_dir=tmp_path / "cut", log=lines.append)
    assert any(line.startswith("resumed from step 3") for line in lines) and resumed["resumed_from"] == 3
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == whole["history"]  # the loss window open at the checkpoint carried over
    # A finished directory is never written again; a checkpoint of other settings is refused.
    with pytest.raises(ValueError, match="exists"):
        finetune(tiny(), schedule, tiny_batches, settings, out_dir=tmp_path / "cut", log=quiet)
    (tmp_path / "other").mkdir()
    shutil.copy(tmp_path / "cut" / CHECKPOINT, tmp_path / "other" / CHECKPOINT)
    with pytest.raises(ValueError, match="other settings.*lr"):
        finetune(tiny(), schedule, tiny_batches, FinetuneSettings(steps=6, checkpoint_every=3), out_dir=tmp_path / "other")
    with pytest.raises(ValueError, match="another schedule"):
        finetune(tiny(), schedule.with_name("x"), tiny_batches, settings, out_dir=tmp_path / "other")


def test_outputs_load_back_with_timm_keys(tmp_path: Path) -> None:
    model = tiny()
    schedule = at(ModelSpec.from_model(model), {1: LayerPlan("prune", keep=0.5)}, name="p")
    finetune(model, schedule, tiny_batches, FinetuneSettings(steps=2), out_dir=tmp_path / "ft", log=quiet)
    state = load_file(tmp_path / "ft" / "model.safetensors")
    assert state.keys() == tiny().state_dict().keys()
    assert Schedule.load(tmp_path / "ft" / "schedule.yaml") == schedule
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["settings"]["steps"] == 2 and metrics["cut_loss_first"] is None


# --- data ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 6 random images (sizes vary) and one corrupt file."""
    return write_image_folder(tmp_path_factory.mktemp("train"), classes=2, per_class=6, height_step=5, width=48)


def test_folder_stream_is_step_indexed_and_skips_unreadable(folder: Path) -> None:
    cfg = data_config(tiny())
    stream = FolderStream(folder, cfg, batch_size=4, seed=3, workers=0)
    assert len(stream) == 13
    keys = [i for step in range(13) for i, _ in stream.keys(step)]  # 52 positions: four epochs
    assert sorted(keys[:13]) == list(range(13)) and sorted(keys[13:26]) == list(range(13))  # each epoch once
    x1, y1 = stream(1)
    x0, y0 = stream(0)  # out of order: the loader restarts
    assert x1.shape == (4, 3, 32, 32) and x1.dtype == torch.float32 and set(y1.tolist()) <= {0, 1}
    assert torch.equal(stream(1)[0], x1) and not torch.equal(x0, x1)
    all_steps = [stream(s) for s in range(4)]
    assert stream.skipped >= 1  # the broken file was replaced, the batch kept its size
    assert all(x.shape[0] == 4 for x, _ in all_steps)
    workers = train_stream(str(folder), cfg, 4, 3)  # two workers: augmentation is seeded per image
    assert torch.equal(workers(1)[0], x1) and torch.equal(workers(2)[0], all_steps[2][0])


def test_full_crop_scale_keeps_the_whole_image(tmp_path: Path) -> None:
    """crop_scale=1.0: the random-resized crop keeps the whole image (only flips and colour change it)."""
    from PIL import Image

    (tmp_path / "a").mkdir()
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, :16] = 255  # left half white: a crop shows it as a different share of the image
    Image.fromarray(image).save(tmp_path / "a" / "0.png")
    cfg = dict(data_config(tiny()), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    whole = FolderStream(tmp_path, cfg, batch_size=16, seed=0, workers=0, crop_scale=1.0)(0)[0]
    cropped = FolderStream(tmp_path, cfg, batch_size=16, seed=0, workers=0)(0)[0]
    white = lambda x: (x.mean(dim=(1, 2)) > x.mean(dim=(1, 2, 3))[:, None]).float().mean(1)  # noqa: E731 - bright columns
    assert torch.allclose(white(whole), torch.full((16,), 0.5), atol=0.07)
    assert (white(cropped) - 0.5).abs().max() > 0.2


def test_embedded_stream_is_fixed_and_not_the_training_stream() -> None:
    stream = train_stream(None, {}, 8, 0)
    x, y = stream(3)
    assert torch.equal(stream(3)[0], x) and x.shape == (8, 3, 64, 64) and abs(x.mean().item()) < 1.0
    assert not torch.equal(x, synthetic.normalize(synthetic.stream_batch(3, 8, seed=0)[0]))


# --- the must-show, small ------------------------------------------------------------------------

def test_finetuning_recovers_an_aggressive_idle_schedule(tmp_path: Path) -> None:
    """IdleViT at keep 0.25 from block 1 on (37 % of the GMACs): 40 steps of 32 images raise held-out
    top-1 and agreement with the unreduced model, and the token cut loss falls (measured: +24 to +25
    points top-1 from 72 %, cut loss -17 % over seeds 0-2)."""
    model = load_model()
    spec = ModelSpec.from_model(model, name=DEFAULT_MODEL)
    schedule = at(spec, {i: LayerPlan("idle", keep=0.25) for i in range(1, 12)}, name="idle-0.25")
    assert 0.3 < gmacs(schedule) / gmacs(Schedule.empty(spec)) < 0.45
    settings = FinetuneSettings(steps=40, batch_size=32, lr=3e-4, checkpoint_every=100)
    m = finetune(model, schedule, train_stream(None, data_config(model), 32, 0), settings, out_dir=tmp_path / "ft",
                 eval_set=embedded_set(300), log=quiet)
    before, after = m["before"], m["after"]
    assert after["top1"] >= before["top1"] + 0.03, (before, after)
    assert after["agreement"] > before["agreement"], (before, after)
    assert m["cut_loss_last"] < 0.92 * m["cut_loss_first"], (m["cut_loss_first"], m["cut_loss_last"])


# --- the command line ---------------------------------------------------------------------------

def export(tmp_path: Path, schedule: Schedule, model: str | None = DEFAULT_MODEL) -> Path:
    run = {"model": model, "checkpoint": None, "data": None, "budget_gmacs": 0.1, "run_dir": str(tmp_path / "run")}
    record = {"trial": 7, "preset": None, "fidelity": "screen", "accuracy": 0.9, "gmacs": gmacs(schedule),
              "schedule": schedule.to_dict()}
    return export_configs(tmp_path / "run", [record], run=run)[0]


def embedded_schedule() -> Schedule:
    return at(ModelSpec.from_model(load_model(), name=DEFAULT_MODEL), {2: LayerPlan("idle", keep=0.5),
                                                                       4: LayerPlan("prune", keep=0.5)}, name="mix")


def test_cli_finetune_end_to_end_and_eval_loads_the_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = export(tmp_path, embedded_schedule())
    schedule, source = load_job(config)
    assert schedule.name == "mix" and source["model"] == DEFAULT_MODEL
    args = ["finetune", "--config", str(config), "--steps", "4", "--batch-size", "8", "--num-images", "40", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    ft = tmp_path / "run" / "finetune" / "0007"
    assert out["weights"] == str(ft / "model.safetensors") and out["steps"] == 4
    for key in ("top1_before", "top1_after", "cut_loss_first", "cut_loss_last", "seconds"):
        assert out[key] is not None, key
    assert {p.name for p in ft.iterdir()} == {"checkpoint.pt", "model.safetensors", "schedule.yaml", "metrics.json"}
    assert main(["eval", "--checkpoint", out["weights"], "--schedule", str(ft / "schedule.yaml"), "--num-images", "40",
                 "--no-timing", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["top1"] == pytest.approx(out["top1_after"])  # the saved weights are the student scored
    assert main(args) == 2  # finished: nothing is overwritten
    assert "nothing is overwritten" in capsys.readouterr().err


def test_cli_epochs_over_a_folder(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = export(tmp_path, embedded_schedule())
    assert main(["finetune", "--config", str(config), "--data", str(folder), "--epochs", "2", "--batch-size", "4",
                 "--num-images", "20", "--out", str(tmp_path / "ft"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 * (13 // 4) and (tmp_path / "ft" / "model.safetensors").is_file()


def _bad_cli(tmp_path: Path, case: str) -> list[str]:
    """Arguments after `finetune` for each kind of bad input."""
    if case == "missing config":
        return ["--config", str(tmp_path / "nope.yaml"), "--steps", "1"]
    if case == "malformed config":
        (tmp_path / "bad.yaml").write_text("schedule: [unclosed\n")
        return ["--config", str(tmp_path / "bad.yaml"), "--steps", "1"]
    if case == "no schedule":
        (tmp_path / "empty.yaml").write_text("trial: 3\n")
        return ["--config", str(tmp_path / "empty.yaml"), "--steps", "1"]
    good = str(export(tmp_path, embedded_schedule()))
    if case == "steps 0":
        return ["--config", good, "--steps", "0"]
    if case == "crop scale 0":
        return ["--config", good, "--steps", "1", "--crop-scale", "0"]
    if case == "model mismatch":
        return ["--config", good, "--model", "deit_tiny_patch16_224", "--steps", "1"]
    shutil.rmtree(tmp_path / "run")  # "does not fit": a schedule for another shape, searched on the embedded model
    return ["--config", str(export(tmp_path, at(ModelSpec.from_model(tiny()), {1: LayerPlan("prune", keep=0.5)}))),
            "--steps", "1"]


@pytest.mark.parametrize("case", ["missing config", "malformed config", "no schedule", "steps 0", "crop scale 0",
                                  "model mismatch", "does not fit"])
def test_cli_bad_input_is_one_line_and_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["finetune", *_bad_cli(tmp_path, case)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert not (tmp_path / "run" / "finetune").exists()


# --- several processes -------------------------------------------------------------------------

DDP_SCRIPT = """
import sys, timm, torch
from search.finetune import FinetuneSettings, finetune
from spaces import LayerPlan, ModelSpec, Schedule
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=5)
spec = ModelSpec.from_model(model)
schedule = Schedule(spec, (LayerPlan(), LayerPlan("idle", keep=0.5), LayerPlan("merge", keep=0.5), LayerPlan()))
batches = lambda s: (torch.randn(4, 3, 32, 32), torch.arange(4) % 5)
m = finetune(model, schedule, batches, FinetuneSettings(steps=3, checkpoint_every=2), out_dir=sys.argv[1])
print("world", m["world_size"], "images", m["images"])
"""


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, str(script), str(tmp_path / "ft")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("world 2 images 24") == 2
    assert (tmp_path / "ft" / "model.safetensors").is_file()
