"""The subcommands: gmacs, eval, search, finetune, make-data. Each takes the parsed flags and
returns the exit code; bad input raises ValueError (main prints it as one `error:` line)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from search.cli.checks import check_device, check_out_dir, check_search_inputs


def _resolve_schedule(args: argparse.Namespace, spec):  # type: ignore[no-untyped-def]
    from spaces import Schedule, from_preset

    if args.preset is not None:
        return _check_merge_counts(from_preset(args.preset, spec), f"--preset {args.preset}")
    try:
        schedule = Schedule.load(args.schedule)
    except UnicodeDecodeError:
        raise ValueError(f"--schedule {args.schedule}: not a text file (expected YAML or JSON)") from None
    except ValueError as err:
        if str(args.schedule) in str(err):
            raise
        raise ValueError(f"--schedule {args.schedule}: {err}") from None
    _check_merge_counts(schedule, f"--schedule {args.schedule}")
    if not schedule.model.same_shape(spec):
        raise ValueError(
            f"schedule {args.schedule} is for {schedule.model.name} (depth {schedule.model.depth}, "
            f"{schedule.model.tokens} tokens, width {schedule.model.embed_dim}), not {spec.name} "
            f"(depth {spec.depth}, {spec.tokens} tokens, width {spec.embed_dim})"
        )
    return schedule


def _check_merge_counts(schedule, what: str):  # type: ignore[no-untyped-def]
    """A merge count r above half the patch tokens can never be met (ToMe merges at most half of
    them in a block; its code clamps r silently), so it is a typo, not a schedule."""
    most = schedule.model.num_patches // 2
    for i, plan in enumerate(schedule.layers):
        if plan.r is not None and plan.r > most:
            raise ValueError(f"{what}: block {i} merges r={plan.r} tokens, but a block can merge at most {most} "
                             f"(half of {schedule.model.num_patches} patch tokens)")
    return schedule


def cmd_gmacs(args: argparse.Namespace) -> int:
    from search.models import model_spec
    from spaces import Schedule, breakdown, gmacs

    spec = model_spec(args.model)
    schedule = _resolve_schedule(args, spec)
    total, base = gmacs(schedule), gmacs(Schedule.empty(spec))
    rows = breakdown(schedule)
    if args.json:
        print(json.dumps({
            "model": spec.name, "schedule": schedule.name, "gmacs": round(total, 6), "baseline_gmacs": round(base, 6),
            "ratio": round(total / base, 6), "tokens": [r.tokens_in for r in rows],
            "tokens_out": rows[-1].tokens_out, "summary": schedule.summary(),
            "blocks": [{"index": r.index, "method": r.method, "tokens_in": r.tokens_in, "tokens_attn": r.tokens_attn,
                        "tokens_mlp": r.tokens_mlp, "gmacs": r.macs / 1e9, "overhead_gmacs": r.overhead_macs / 1e9}
                       for r in rows],
        }))
        return 0
    print(f"model     {spec.name}  ({spec.depth} blocks, {spec.tokens} tokens, width {spec.embed_dim})")
    print(f"schedule  {schedule.name}: {schedule.summary()}")
    print(f"GMACs     {total:.3f}  ({100 * total / base:.1f} % of {base:.3f})")
    print("block  method     tokens in  attn  mlp   GMACs")
    for r in rows:
        print(f"{r.index:5d}  {r.method:9s}  {r.tokens_in:9d}  {r.tokens_attn:4d}  {r.tokens_mlp:4d}  {r.macs / 1e9:.4f}")
    print(f"tokens leaving the last block: {rows[-1].tokens_out}")
    return 0


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Model (eval mode, on the device), its spec, and the screening set, from the CLI flags."""
    from search.data import load_eval_set
    from search.models import data_config, load_model
    from spaces import ModelSpec

    check_device(args.device)
    if args.model is not None and not args.pretrained and args.checkpoint is None:
        print(f"warning: {args.model} has random weights (add --pretrained or --checkpoint)", file=sys.stderr)
    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, device=args.device)
    data = load_eval_set(args.data, data_config(model), num_images=args.num_images, seed=args.seed,
                         num_classes=model.num_classes)
    if data.skipped:
        print(f"warning: skipped {data.skipped} unreadable image(s)", file=sys.stderr)
    return model, ModelSpec.from_model(model, name=args.model or model.pretrained_cfg.get("architecture")), data


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from search.evaluate import eval_batch_size, evaluate, predict

    if args.compile:
        check_device(args.device)
        _check_compile_runs(args.device)
    model, spec, data = _load(args)
    schedule = _resolve_schedule(args, spec)
    args.batch_size = eval_batch_size(args.batch_size, args.device)
    reference = predict(model, data, batch_size=args.batch_size)
    amp = torch.bfloat16 if args.device == "cpu" else torch.float16
    timing = None if args.no_timing else {"batch_size": args.timing_batch, "repeats": args.repeats,
                                          "dtype": amp if args.amp else torch.float32}
    result = {"model": spec.name, "data": data.source, **evaluate(model, schedule, data, reference,
                                                                  batch_size=args.batch_size, timing=timing)}
    result["skipped_images"] = data.skipped
    if args.compile:
        result["compiled"] = _compiled(args, model, schedule, data)
    if args.json:
        print(json.dumps(result))
        return 0
    pct = lambda v: "n/a (no labels)" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    print(f"model      {spec.name} on {data.source} ({result['num_images']} images)")
    print(f"schedule   {result['schedule']}: {result['summary']}")
    print(f"top-1      {pct(result['top1'])}   top-5 {pct(result['top5'])}")
    print(f"agreement  {100 * result['agreement']:.2f} % with the unreduced model (KL {result['kl']:.4f})")
    print(f"GMACs      {result['gmacs']:.3f} of {result['baseline_gmacs']:.3f} ({100 * result['gmacs'] / result['baseline_gmacs']:.1f} %)")
    if timing is not None:
        print(f"speed      {result['images_per_s']:.1f} images/s vs {result['baseline_images_per_s']:.1f} unreduced: "
              f"{result['speedup']:.2f}x (range {result['speedup_min']:.2f}-{result['speedup_max']:.2f}, "
              f"batch {result['batch_size']}, median of {result['repeats']})")
    if args.compile:
        c = result["compiled"]
        print(f"compiled   {c['images_per_s']:.1f} images/s vs {c['baseline_images_per_s']:.1f} unreduced, both under "
              f"torch.compile: {c['speedup']:.2f}x (eager in the same pairs {c['eager_speedup']:.2f}x); max |logit "
              f"difference| to eager {c['max_abs_logit_diff']:.2e}; compile {c['compile_seconds']:.1f} s "
              f"(unreduced {c['baseline_compile_seconds']:.1f} s); {c['graphs']} graph(s), {c['graph_breaks']} "
              f"break(s), {c['recompiles']} recompile(s) over {c['batches']} more batches")
    return 0


def _compiled(args: argparse.Namespace, model, schedule, data) -> dict:  # type: ignore[no-untyped-def]
    """The schedule under torch.compile: outputs against eager, compile time, breaks, compiled speed-up."""
    from dataclasses import asdict

    from search.compiled import compiled_run

    images = next(data.batches(min(len(data), 64), next(model.parameters()).device))[0]
    return {**asdict(compiled_run(model, schedule, images, batch_size=args.timing_batch, repeats=args.repeats)),
            "batches": 3}


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def search_config(args: argparse.Namespace, argv: Sequence[str]):  # type: ignore[no-untyped-def]
    """Validate the search flags into a SearchConfig (ValueError on bad input)."""
    import math
    from dataclasses import replace
    from pathlib import Path

    from search.config import SearchConfig
    from search.driver import command_line, default_min_gmacs
    from search.evaluate import eval_batch_size
    from search.models import DEFAULT_MODEL, RANDOM_INIT_SEED, model_spec
    from search.pareto import OBJECTIVES
    from search.run_dir import SAMPLERS, default_out
    from search.worker import FinetuneJob, WorkerSetup
    from spaces import Schedule, gmacs
    from spaces.budget import parse_budget
    from spaces.search_space import SearchSpace

    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; valid: {', '.join(SAMPLERS)}")
    objectives = _split(args.objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise ValueError(f"unknown objective(s) {bad or '(none)'}; valid: {', '.join(OBJECTIVES)}")
    check_device(args.device)
    spec = model_spec(args.model or DEFAULT_MODEL)
    baseline = gmacs(Schedule.empty(spec))
    budget = parse_budget(args.budget, baseline)
    if not math.isfinite(budget) or budget > baseline * (1 + 1e-9):
        raise ValueError(f"--budget {args.budget} is {budget:.4g} GMACs, above the unreduced {spec.name} "
                         f"({baseline:.4f} GMACs); use at most 100%")
    space = SearchSpace(args.space, spec, methods=_split(args.methods) if args.methods else None, budget_gmacs=budget)
    if args.min_gmacs is not None:
        try:
            min_gmacs = parse_budget(args.min_gmacs, baseline)
        except ValueError as err:
            raise ValueError(f"--min-gmacs {args.min_gmacs}: " + str(err).replace("budget", "value")) from None
        if not math.isfinite(min_gmacs) or min_gmacs > budget:
            raise ValueError(f"--min-gmacs {args.min_gmacs} is {min_gmacs:.4g} GMACs, above the budget ({budget:.4f} GMACs)")
    else:
        min_gmacs = default_min_gmacs(space, presets=not args.no_presets)
    space = replace(space, min_gmacs=min_gmacs)
    timing = None
    if {"speedup", "images_per_s"} & set(objectives):
        timing = (("batch_size", args.timing_batch), ("repeats", 3), ("warmup", 1))
    if args.finetune_top:
        if args.data and not args.finetune_data:
            raise ValueError("--finetune-top with --data needs --finetune-data (training images; --data is the "
                             "screening set and must not be trained on)")
        if not args.finetune_lr > 0:
            raise ValueError(f"--finetune-lr must be positive, got {args.finetune_lr}")
    check_search_inputs(args)
    _check_compile(args)
    if args.model is not None and not args.pretrained and args.checkpoint is None:
        print(f"warning: {args.model} has random weights (add --pretrained or --checkpoint); every worker "
              f"initialises it from seed {RANDOM_INIT_SEED}", file=sys.stderr)
    latency_profile = _check_latency_profile(args, spec)
    setup = WorkerSetup(space=space, model=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                        data=args.data, num_images=args.num_images, seed=args.seed,
                        batch_size=eval_batch_size(args.batch_size, args.device), device=args.device,
                        threads=max(1, int(args.cpus_per_trial)), timing=timing,
                        objectives=objectives, confirm_images=args.confirm_images,
                        stop_chunk=args.stop_chunk or None, prefix_cache_mb=args.prefix_cache_mb,
                        screen_precision=args.screen_precision, shared_bars=not args.deterministic,
                        trial_timeout=args.trial_timeout)
    faults, ft_faults = ({int(k): v for k, v in (item.split(":") for item in _split(text))}
                         for text in (args.fail_trials, args.fail_finetunes))
    job = None
    if args.finetune_top:
        job = FinetuneJob(steps=args.finetune_steps, out_root="", data=args.finetune_data,
                          batch_size=args.finetune_batch, lr=args.finetune_lr, crop_scale=args.finetune_crop_scale,
                          timeout=args.finetune_timeout)
    return SearchConfig(setup=setup, budget=args.budget, out=Path(args.out) if args.out else default_out(),
                        trials=args.trials, sampler=args.sampler, resume=args.resume, storage=args.storage,
                        ray_address=args.ray_address, cpus_per_trial=args.cpus_per_trial,
                        gpus_per_trial=args.gpus_per_trial, concurrency=args.concurrency,
                        presets=not args.no_presets, seed=args.seed, command=command_line(list(argv)),
                        fault_trials=faults, finetune_top=args.finetune_top, finetune=job, retries=args.retries,
                        fault_finetunes=ft_faults, timing_batch=args.timing_batch,
                        latency_batch=args.latency_batch, latency_profile=latency_profile, retime=not args.no_retime,
                        compile=args.compile, deterministic=args.deterministic)


def _check_compile(args: argparse.Namespace) -> None:
    """--compile re-times the front, so it needs the re-timing and a torch.compile that runs here."""
    if not args.compile:
        return
    if args.no_retime:
        raise ValueError("--compile re-times the front under torch.compile: it cannot be combined with --no-retime")
    _check_compile_runs(args.device)


def _check_compile_runs(device: str) -> None:
    """ValueError saying why, where torch.compile (inductor) cannot run on `device`."""
    from search.compiled import compile_unavailable

    why = compile_unavailable(device)
    if why is not None:
        raise ValueError(f"--compile: torch.compile cannot run here: {why}")


def _check_latency_profile(args: argparse.Namespace, spec) -> str | None:  # type: ignore[no-untyped-def]
    """--latency-profile must be a profile measured for this run's key (model, device, torch, dtype,
    --timing-batch, threads): its absolute path, or ValueError."""
    from pathlib import Path

    from search.latency import check_fits, current_key, load_matching

    if not args.latency_profile:
        return None
    path = Path(args.latency_profile).resolve()
    if not path.is_file():
        raise ValueError(f"--latency-profile {args.latency_profile}: no such file")
    key = current_key(spec.name, args.device, batch=args.timing_batch, threads=max(1, int(args.cpus_per_trial)))
    check_fits(load_matching(path, key), spec, f"--latency-profile {args.latency_profile}")
    return str(path)


def cmd_search(args: argparse.Namespace, argv: Sequence[str] = (), *, exiting: bool = False) -> int:
    from search.driver import check_budget, run

    cfg = search_config(args, argv)
    check_budget(cfg.setup.space)
    return run(cfg, exiting=exiting).exit_code


def _finetune_model(args: argparse.Namespace, schedule, source: dict):  # type: ignore[no-untyped-def]
    """The model to fine-tune (on the CPU; finetune moves it): the config's model and checkpoint unless overridden."""
    import reducers
    from search.models import DEFAULT_MODEL, load_model

    searched = source.get("model") or schedule.model.name
    if args.model is not None and args.model != searched:
        raise ValueError(f"--model {args.model} is not {searched}, the model config {args.config} was searched on")
    checkpoint = args.checkpoint or source.get("checkpoint")
    pretrained = args.pretrained or bool(source.get("pretrained"))
    if searched != DEFAULT_MODEL and not pretrained and checkpoint is None:
        print(f"warning: {searched} has random weights (add --pretrained or --checkpoint)", file=sys.stderr)
    model = load_model(None if searched == DEFAULT_MODEL else searched, pretrained=pretrained, checkpoint=checkpoint)
    reducers.apply_schedule(model, schedule)  # a ValueError now if the schedule does not fit the model
    reducers.remove_schedule(model)
    return model


def cmd_finetune(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from search import finetune as ft
    from search.data import load_eval_set
    from search.models import data_config

    check_device(args.device)
    schedule, source = ft.load_job(args.config)
    out = Path(args.out) if args.out else Path(args.config).parent.parent / "finetune" / Path(args.config).stem
    check_out_dir(out, "--out")
    if (out / ft.WEIGHTS).exists():
        raise ValueError(f"{out} holds a finished fine-tune ({ft.WEIGHTS}); nothing is overwritten (choose another --out)")
    model = _finetune_model(args, schedule, source)
    stream = ft.train_stream(args.data, data_config(model), args.batch_size, ft.rank_seed(args.seed),
                             num_classes=model.num_classes, crop_scale=args.crop_scale)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = max(1, (ft.EMBEDDED_EPOCH if args.data is None else len(stream)) // (args.batch_size * world))
    steps = args.steps or (args.epochs or 30) * per_epoch
    settings = ft.FinetuneSettings(steps=steps, batch_size=args.batch_size, lr=args.lr, alpha=args.alpha,
                                   beta=args.beta, theta=args.theta, checkpoint_every=args.checkpoint_every,
                                   seed=args.seed, eval_every=args.eval_every)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: the other processes only train
        ft.finetune(model, schedule, stream, settings, out_dir=out, device=args.device)
        return 0
    eval_data = args.eval_data or source.get("data")
    if eval_data is not None and args.data is not None and Path(eval_data).resolve() == Path(args.data).resolve():
        print(f"warning: training and held-out images are the same directory ({eval_data})", file=sys.stderr)
    eval_set = load_eval_set(eval_data, data_config(model), num_images=args.num_images, seed=args.seed,
                             num_classes=model.num_classes)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    log(f"fine-tuning {schedule.name} ({schedule.summary()}) for {steps} steps of {args.batch_size} -> {out}")
    metrics = ft.finetune(model, schedule, stream, settings, out_dir=out, eval_set=eval_set, device=args.device, log=log)
    return _print_finetune(args, out, metrics)


def _print_finetune(args: argparse.Namespace, out, m: dict) -> int:  # type: ignore[no-untyped-def]
    """The one summary line (or JSON object) of a finished fine-tune."""
    before, after = m["before"] or {}, m["after"] or {}
    result = {"config": str(args.config), "out": str(out), "weights": m["weights"], "schedule": m["schedule"],
              "steps": m["steps"], "seconds": m["seconds"], "images_per_s": m["images_per_s"],
              "top1_before": before.get("top1"), "top1_after": after.get("top1"),
              "agreement_before": before.get("agreement"), "agreement_after": after.get("agreement"),
              "cut_loss_first": m["cut_loss_first"], "cut_loss_last": m["cut_loss_last"], "gmacs": m["gmacs"],
              "resumed_from": m["resumed_from"]}  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    cut = "" if m["cut_loss_first"] is None else f", cut loss {m['cut_loss_first']:.4f} -> {m['cut_loss_last']:.4f}"
    print(f"fine-tuned {m['schedule']} for {m['steps']} steps in {m['seconds']:.0f} s ({m['images_per_s']:.1f} img/s): "
          f"top-1 {pct(result['top1_before'])} -> {pct(result['top1_after'])}{cut}; weights {m['weights']}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Build (or reuse) the latency profile of a model on this device and print its table."""
    from pathlib import Path

    import torch

    from search import latency
    from search.models import DEFAULT_MODEL, load_model

    check_device(args.device)
    key = latency.current_key(args.model or DEFAULT_MODEL, args.device, batch=args.timing_batch, threads=args.threads)
    out = Path(args.out) if args.out else latency.cache_path(key)
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out}: not a file")
    profile = None
    if out.is_file() and not args.rebuild:
        try:
            profile = latency.load_matching(out, key)
        except ValueError as err:
            if args.out:  # a file named on purpose is not replaced silently
                raise ValueError(f"{err}; add --rebuild to replace it") from None
    built = profile is None
    if built:
        torch.set_num_threads(args.threads)
        model = load_model(args.model, device=args.device)  # weights do not change the time
        log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        profile = latency.build(model, key, log=log)
        profile.save(out)
    return _print_profile(args, profile, out, built)


def _print_profile(args: argparse.Namespace, profile, out, built: bool) -> int:  # type: ignore[no-untyped-def]
    from search import latency

    how = f"built in {profile.build_seconds:.1f} s" if built else "reused (its key matches)"
    if args.json:
        print(json.dumps({"file": str(out), "built": built, **profile.to_dict()}))
        return 0
    k = profile.key
    print(f"latency profile {out}: {how}")
    print(f"key        {k.model} on {k.device} ({k.device_name}), torch {k.torch}, {k.dtype}, batch {k.batch}, "
          f"{k.threads} thread(s)")
    print("ms per batch of one block, by patch tokens entering it (timed; the prediction uses a fitted quadratic)")
    print(f"{'kind':<12}" + "".join(f"{n:>8}" for n in profile.grid))
    for kind, values in profile.tables.items():
        print(f"{kind:<12}" + "".join(f"{v / 1e3:>8.2f}" for v in values))
    full = latency.predict_us(profile, latency.Schedule.empty(latency.ModelSpec.from_dict(profile.spec)))
    print(f"fitted to {len(profile.calibration)} whole models: whole = {profile.rest_us / 1e3:.2f} ms + "
          f"{profile.scale:.3f} x the blocks")
    print(f"rest of the model {profile.rest_us / 1e3:.2f} ms; unreduced model predicted {full / 1e3:.2f} ms "
          f"({k.batch / (full * 1e-6):.1f} images/s)")
    return 0


def cmd_make_data(args: argparse.Namespace) -> int:
    from search.embedded.synthetic import CLASS_NAMES, write_folder

    check_out_dir(args.out, "make-data")
    root = write_folder(args.out, args.split, args.num_images, args.seed)
    print(f"wrote {args.num_images} {args.split} images of the embedded default to {root}/ "
          f"({len(CLASS_NAMES)} class folders, 64x64 PNG)")
    return 0


COMMANDS = {"gmacs": cmd_gmacs, "eval": cmd_eval, "search": cmd_search, "finetune": cmd_finetune,
            "profile": cmd_profile, "make-data": cmd_make_data}
