"""The CLI's commands: one function per command, taking the parsed arguments. Heavy imports happen inside
commands so that ``erasekit --help`` is instant; each command checks its options before its ``_load``, and the
work itself lives in the modules it belongs to (``erasekit.demo``, ``erasekit.tinyworld.eval``, ``erasekit.audit``,
``erasekit.bench``, ...)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

from ..errors import ConfigError
from .types import DEFAULT_OUT_DIR, out_dir


def _load(args):
    from ..loading import load_pipeline

    return load_pipeline(args.model, device=args.device, dtype=args.dtype, config=args.model_config)


def _make_dir(path: Path) -> Path:
    """Create an output folder (after the work that fills it, so a failed command leaves none behind)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {str(path)!r}: {e.strerror}") from None
    return path


def printable(value) -> str:
    """``value`` as text with control characters escaped: a record's strings must not drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(value))


def _file_stem(prompt: str) -> str:
    """A prompt as part of a file name: runs of anything but letters, digits, '-' and '.' (spaces, path
    separators, control characters) become one '_'; at most 60 characters."""
    return re.sub(r"[^\w.-]+", "_", prompt)[:60]


# ------------------------------------------------------------------------------------------- erase

def erase_command(args, method_spec) -> int:
    import time

    out = args.out
    config = erase_config(args, method_spec)  # a bad option fails here, before the model is loaded
    if args.gate:
        from ..compose import why_not_gated

        refusal = why_not_gated([] if method_spec.changes == "nothing" else [method_spec.changes])
        if refusal:
            raise ConfigError(f"--gate: method {method_spec.name!r} {refusal}")
    pipe = _load(args)
    started = time.perf_counter()
    adapter = method_spec.erase(pipe, config)
    seconds = time.perf_counter() - started
    if args.gate:
        from .. import compose

        adapter = compose.gated(adapter, metric=args.gate)
    from ..core import processes

    if not processes.current().is_main_process:  # launched data parallel: every process has the adapter, one writes
        return 0
    _make_dir(out.parent)
    adapter.save(out, dtype=args.save_dtype)
    what = f"a {adapter.guard['rule']} guard, no weight changes" if adapter.is_guard else f"{len(adapter.deltas)} modules"
    print(f"erased {', '.join(config.concepts)} with {method_spec.name} in {seconds:.2f} s "
          f"→ {out} ({out.stat().st_size / 1e6:.2f} MB, {what})")
    return 0


def erase_config(args, method_spec):
    """The method's config from ``--config`` and the flags, built as ``erasekit.erase`` builds it (with the
    tinyworld preset when ``--model`` is a tinyworld model)."""
    from .config import config_from_args, read_toml
    from ..methods.presets import on_mmdit
    from ..tinyworld import is_tinyworld

    folder = _model_folder(args)
    return config_from_args(method_spec, args, read_toml(args.config) if args.config else {}, is_tinyworld(folder),
                            on_mmdit(folder))


# ---------------------------------------------------------------------------------------- generate

def generate_command(args) -> int:
    from ..generate import contact_sheet, generate

    prompts = [p for p in args.prompt for _ in args.seed]
    seeds = [s for _ in args.prompt for s in args.seed]
    if args.out is not None and len(prompts) > 1:
        raise ConfigError(f"--out names one image, but {len(args.prompt)} prompt(s) × {len(args.seed)} seed(s) "
                          f"make {len(prompts)}: give --out-dir FOLDER for several")
    folder = args.out_dir
    if args.out is None and folder is None:
        try:
            folder = out_dir(DEFAULT_OUT_DIR)
        except argparse.ArgumentTypeError as e:
            raise ConfigError(str(e)) from None
    if args.judge and not (Path(_model_folder(args)) / "judge").is_dir():
        raise ConfigError("--judge needs a tinyworld model (its judge ships beside it); for real models use "
                          "`erasekit audit --judge clip|nudenet`")
    pipe = _load(args)
    if args.adapter:
        from .. import compose

        for path, weight in args.adapter:
            compose.load(pipe, path, weight=weight)
    images = generate(pipe, prompts, seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      negative_prompt=args.negative_prompt, progress=len(prompts) > 8)
    if args.out is not None:
        _make_dir(args.out.parent)
        images[0].save(args.out)
        written = [args.out]
    else:
        _make_dir(folder)
        written = []
        for k, (im, p, s) in enumerate(zip(images, prompts, seeds)):
            path = folder / f"{k:03d}-seed{s}-{_file_stem(p)}.png"
            im.save(path)
            written.append(path)
        contact_sheet(images).save(folder / "contact_sheet.png")
        written.append(folder / "contact_sheet.png")
    verdicts = _judge_lines(args, pipe, images, prompts, seeds) if args.judge else []
    for line in verdicts:
        print(line)
    print(f"wrote {len(written)} file(s): {written[0]}" + (f" … {written[-1]}" if len(written) > 1 else ""))
    return 0


def _judge_lines(args, pipe, images, prompts, seeds) -> list[str]:
    from .. import tinyworld

    judgement = tinyworld.load_judge(Path(_model_folder(args)))(images)
    lines = []
    for k, (p, s) in enumerate(zip(prompts, seeds)):
        parts = []
        for attribute in tinyworld.ATTRIBUTES:
            label = judgement.labels(attribute)[k]
            parts.append(f"{label} ({judgement.probs[attribute][k].max():.2f})")
        lines.append(f"judge: seed {s} {p!r}: " + ", ".join(parts))
    return lines


# ----------------------------------------------------------------------------------------- inspect

def inspect_command(args) -> int:
    from ..adapter import describe, load_adapter

    adapter = load_adapter(args.adapter)
    size = Path(args.adapter).stat().st_size
    if args.json:
        print(json.dumps(describe(adapter), indent=2))
        return 0
    d = describe(adapter, size)
    lines = [f"{args.adapter}: {d['method']} erasing {', '.join(d['concepts'])}",
             f"  base model : {d['base_model'] or '(not recorded)'}"]
    if adapter.is_guard:  # an inference-time guard: no weight changes, a rule applied at generation
        lines.append(f"  kind       : guard ({d['guard'].get('rule')}: applied at generation time, changes no weights)"
                     f"   fingerprinted: {', '.join(d['fingerprint']) or '-'}")
        lines.append(f"  guard      : {json.dumps(d['guard'], sort_keys=True)}")
    else:
        lines.append(f"  kind       : weights   components: {', '.join(d['components'])}   gating: "
                     f"{d['gating'].get('rule')}")
    lines += [f"  size       : {size / 1e6:.3f} MB, {d['parameters']:,} parameters in {len(d['modules'])} modules",
              f"  config     : {json.dumps(d['config'], sort_keys=True)}"]
    if d["info"]:  # what the erase recorded: rank, training losses and time, RECE's kept epoch, ...
        lines.append(f"  record     : {json.dumps(d['info'], sort_keys=True)}")
    if d["stats"]:
        lines.append(f"  stats      : {', '.join(d['stats'])}" + ("" if adapter.is_guard else " (exact merging)"))
    for m in d["modules"]:
        lines.append(f"    {m['module']:<80} {m['kind']:<8} rank {m['rank'] if m['rank'] is not None else '-':<4} "
                     f"{m['shape']}")
    print("\n".join(printable(line) for line in lines))  # the file's strings are data, not terminal commands
    return 0


# ------------------------------------------------------------------------------ export / fuse / merge

def export_command(args) -> int:
    from .. import export
    from ..adapter import load_adapter

    adapter = load_adapter(args.adapter)
    write = export.to_diffusers if args.to == "diffusers" else export.to_kohya
    with warnings.catch_warnings(record=True) as caught:  # what the export did (e.g. exact full-rank factors)
        warnings.simplefilter("always")
        write(adapter, args.out, svd_rank=args.svd_rank)
    for w in caught:
        print(f"erasekit: note: {w.message}", file=sys.stderr)
    print(f"wrote {args.out} ({args.to} LoRA layout, {args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


def fuse_command(args) -> int:
    from .. import export

    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise ConfigError(f"--out {str(args.out)!r} is a folder that is not empty; --overwrite replaces it")
    pipe = _load(args)
    out = export.bake(pipe, args.adapter, args.out, overwrite=args.overwrite)
    print(f"wrote a {type(pipe).__name__} folder with {len(args.adapter)} erasure(s) fused: {out}")
    return 0


def merge_command(args) -> int:
    from ..adapter import load_adapter
    from ..merge import can_merge_exactly, merge

    if args.weights is not None and len(args.weights) != len(args.adapters):
        raise ConfigError(f"{len(args.weights)} --weights for {len(args.adapters)} adapters: give one per adapter")
    adapters = [load_adapter(path) for path in args.adapters]
    exact = can_merge_exactly(adapters, args.weights) and not args.stack
    pipe = _load(args) if exact else None
    merged = merge(adapters, pipe=pipe, weights=args.weights, exact=exact)
    _make_dir(args.out.parent)
    merged.save(args.out)
    print(f"merged {len(adapters)} adapters ({merged.info['merge']}): {', '.join(merged.concepts)} → {args.out}")
    if "merge_note" in merged.info:
        print(f"  {merged.info['merge_note']}")
    return 0


def audit_command(args) -> int:
    from .. import compose
    from ..attacks import ATTACKS
    from ..audit import audit

    attacks = sorted(ATTACKS) if args.attack == ["all"] else args.attack
    for label in attacks:
        name, _, preset = label.partition(":")
        if name not in ATTACKS:
            raise ConfigError(f"unknown attack {name!r}; choose from: all, {', '.join(sorted(ATTACKS))}")
        presets = ATTACKS[name].PRESETS
        if preset and preset not in presets and f"tinyworld-{preset}" not in presets:
            raise ConfigError(f"attack {name!r} has no preset {preset!r}; choose one of: {', '.join(presets)}")
    if len(set(attacks)) != len(attacks):
        raise ConfigError(f"an attack is listed twice: {' '.join(attacks)}")
    prompts = None
    if args.prompts:
        from ..attacks.concepts import read_lines

        prompts = read_lines(args.prompts)
    else:
        from ..tinyworld.prompts import known_concept

        known_concept(args.concept, "; for another concept give --prompts FILE")
    pipe = _load(args)
    for path, weight in args.adapter:
        compose.load(pipe, path, weight=weight)
    report = audit(pipe, args.concept, attacks, prompts=prompts, seeds=args.seed, judge=args.judge,
                   out_dir=args.out_dir, budget=args.budget, batch_size=args.batch_size, full_grid=args.full_grid,
                   base_cache=args.base_cache)
    if report is not None:
        print(report)
        print(f"report: {report.report_md} · {report.report_html}")
    return 0


# --------------------------------------------------------------------------------------- tinyworld

def tinyworld_command(args) -> int:
    if args.tinyworld_command == "train":
        if args.arch == "mmdit":
            from ..tinyworld import mmdit

            config = mmdit.MMDiTTrainConfig(seed=args.seed, steps=args.steps, n_images=args.n_images)
            manifest = mmdit.train(args.out, args.work, config)
        else:
            from ..tinyworld.train import TrainConfig, train

            manifest = train(args.out, args.work, TrainConfig(seed=args.seed, unet_steps=args.steps,
                                                              n_images=args.n_images))
        print(json.dumps(manifest, indent=2))
        return 0
    if args.tinyworld_command == "render":
        import random

        from PIL import Image

        from ..tinyworld import world
        from ..tinyworld.prompts import scene_from_words

        scene = scene_from_words(args.prompt)

        image = Image.fromarray(world.render(scene, random.Random(args.seed)))
        _make_dir(args.out.parent)
        image.save(args.out)
        print(f"rendered {scene} → {args.out}")
        return 0
    # eval
    from .. import tinyworld
    from ..tinyworld.eval import quality, quality_lines, quality_rows

    pipe = _load(args)
    judge = tinyworld.load_judge(Path(_model_folder(args)))
    results = quality(pipe, judge, seeds=tuple(args.seeds))
    rows, ok = quality_rows(results)
    print("\n".join(quality_lines(rows)))
    if args.out:
        from ..core.provenance import run_record

        _make_dir(args.out.parent)
        args.out.write_text(json.dumps({"run": run_record(), "seeds": args.seeds, "results": results,
                                        "rows": rows, "all_bars_met": ok}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if ok else 1


def _model_folder(args) -> str:
    from ..loading import model_path

    return model_path(args.model)


# -------------------------------------------------------------------------------------------- demo

def demo_command(args) -> int:
    """The main job on tinyworld (``erasekit.demo``): erase a concept, print what the judge sees before/after."""
    from .. import tinyworld
    from ..demo import check, run_demo

    check(args.method, args.concept)  # before the model is loaded
    pipe = _load(args)
    judge = tinyworld.load_judge(Path(_model_folder(args)))
    lines = run_demo(pipe, judge, args.concept, args.method, args.seed, args.out_dir)
    print("\n".join(lines))
    print(f"\nimages: {args.out_dir / 'before.png'}, {args.out_dir / 'after.png'}")
    return 0


# --------------------------------------------------------------------------------------------- env

def env_command(args) -> int:
    import platform

    import torch

    from .. import __version__

    lines = {"erasekit": __version__, "python": platform.python_version(), "platform": platform.platform(),
             "torch": torch.__version__, "cuda available": torch.cuda.is_available()}
    for mod in ("diffusers", "transformers", "accelerate", "safetensors", "peft", "open_clip", "nudenet"):
        try:
            lines[mod] = __import__(mod).__version__
        except Exception:
            lines[mod] = "not installed"
    if torch.cuda.is_available():
        lines["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    from .. import tinyworld

    lines["tinyworld"] = str(tinyworld.path()) + ("" if (tinyworld.path() / "model_index.json").exists() else " (missing!)")
    for k, v in lines.items():
        print(f"{k:<16} {v}")
    return 0


#: ``erasekit bench --processes auto`` on a CPU: one process per core, at most this many (each holds a model)
MAX_LOCAL_PROCESSES = 8


def bench_processes(args) -> int:
    """How many processes ``erasekit bench`` (the suite) runs on this machine: ``--processes``, or for "auto" one
    per CPU core (≤ :data:`MAX_LOCAL_PROCESSES`) on a CPU and one on a GPU; a launched process is one of its
    launcher's, and starts none."""
    from ..core import processes
    from ..core.device import resolve_device

    if processes.launched() or args.target == "perf":
        return 1
    if args.processes != "auto":
        return args.processes
    if resolve_device(args.device).type != "cpu":
        return 1
    return max(1, min(MAX_LOCAL_PROCESSES, processes.cpu_cores()))


def bench_argv(args) -> list[str]:
    """The ``erasekit bench`` arguments of ``args`` (for the processes it starts)."""
    argv = ["bench", args.target, "--out-dir", str(args.out_dir), "--device", args.device]
    argv += ["--quick"] * args.quick
    for flag in ("methods", "attacks", "entries"):
        if getattr(args, flag):
            argv += [f"--{flag}", *getattr(args, flag)]
    for flag in ("work", "model"):
        if getattr(args, flag):
            argv += [f"--{flag}", str(getattr(args, flag))]
    return argv


def bench_command(args) -> int:
    if args.only and args.target != "perf":
        raise ConfigError("--only names perf benchmarks: use it with `erasekit bench perf`")
    if args.target == "perf":
        from ..bench import run_perf

        run_perf(args.out_dir, device=args.device, quick=args.quick, only=args.only)
        return 0
    from ..bench import run_suite, table
    from ..core import processes

    count = bench_processes(args)
    if count > 1:  # the rows shared by processes on this machine (erasekit.bench.shards), as a launcher would
        import subprocess

        from ..bench.suite import check_model, check_selection
        from ..core.device import resolve_device

        check_selection("quick" if args.quick else "full", args.methods, args.attacks, args.entries)  # refused
        check_model(args.model, args.device)  # once here, not by every process
        prefix, env = processes.local_launch(count, cpu=resolve_device(args.device).type == "cpu")
        print(f"erasekit bench: {count} processes share the rows (--processes 1: one process)", flush=True)
        return subprocess.run([*prefix, "-m", "erasekit.cli", *bench_argv(args)], env=env).returncode
    results = run_suite("quick" if args.quick else "full", args.out_dir, methods=args.methods, attacks=args.attacks,
                        entries=args.entries, work_dir=args.work, model=args.model, device=args.device)
    if processes.current().is_main_process:  # launched: the rows were split over the processes, one prints
        print(table(results))
    return 0

