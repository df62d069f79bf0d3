"""The ``erasekit`` command line. One function per command; heavy imports happen inside commands so that
``erasekit --help`` is instant. User errors are ``ErasekitError``s, printed without a traceback (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, ErasekitError

EXAMPLES = {
    "export": """examples:
  erasekit export circle.safetensors --to diffusers --out circle-lora.safetensors   # pipe.load_lora_weights(...)
  erasekit export circle.safetensors --to kohya --out circle-kohya.safetensors      # A1111 / ComfyUI""",
    "fuse": """examples:
  erasekit fuse --adapter circle.safetensors --out ./tinyworld-no-circle
  erasekit fuse --model ./my-sd15 --adapter nudity.safetensors --adapter logo.safetensors:0.8 --out ./sd15-safe""",
    "audit": """examples:
  erasekit audit --adapter circle.safetensors --concept circle --attack unlearndiffatk --out-dir audit/
  erasekit audit --adapter circle.safetensors --concept circle --attack all --seed 0 1 --out-dir audit/
  accelerate launch -m erasekit.cli audit ...      # prompts split over processes; rerun to resume""",
    "merge": """examples:
  erasekit merge circle.safetensors red.safetensors --out both.safetensors     # UCE/TIME: exact joint re-solve
  erasekit merge a.safetensors b.safetensors --weights 1 0.5 --out ab.safetensors   # others: weighted stack""",
    "erase": """examples:
  erasekit erase --method uce --concept circle --out circle.safetensors
  erasekit erase --method uce --concept circle --concept red --preserve square --out two.safetensors
  erasekit erase --method uce --help            # every option of a method
  erasekit erase --method rece --concept circle --config rece.toml --model ./my-sd15 --out c.safetensors""",
    "generate": """examples:
  erasekit generate --prompt "a red circle" --seed 0 --out x.png
  erasekit generate --prompt "a red circle" --adapter circle.safetensors --seed 0 1 2 3 --out-dir out/ --judge
  erasekit generate --prompt "a red circle" --adapter circle.safetensors:0.5 --adapter red.safetensors""",
    "inspect": "example:\n  erasekit inspect circle.safetensors [--json]",
    "tinyworld": """examples:
  erasekit tinyworld eval --out benchmarks/tinyworld_eval.json
  erasekit tinyworld render --prompt "a striped red circle on a black background" --out r.png
  erasekit tinyworld train --out ./tinyworld --work ./tinyworld-work   # ~47 min on 2 CPU cores, resumable""",
    "env": "example:\n  erasekit env",
    "bench": """examples:
  erasekit bench --quick                     # every method (but advunlearn-fast) on the tinyworld suite, ~13 min on 2 CPU cores
  erasekit bench                             # the full suite (every entry, every attack)
  OMP_NUM_THREADS=1 erasekit bench --entries shape colour &  OMP_NUM_THREADS=1 erasekit bench --entries texture multi
                                             # the full suite as two processes sharing one cache; then
  erasekit bench                             # assembles their rows into benchmarks/results-full.json
  erasekit bench --quick --methods uce spm --attacks unlearndiffatk p4d
  erasekit bench perf                        # erase time, training memory, composition overhead (SD 1.5 shapes)""",
    "demo": """examples:
  erasekit demo                                  # UCE erases "circle" from tinyworld, judged before/after
  erasekit demo --method rece --concept red --out-dir demo-red""",
}


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id, local diffusers folder, or single .safetensors/.ckpt "
                   "checkpoint (default: the packaged tinyworld)")
    p.add_argument("--model-config", default=None, help="for a single-file checkpoint offline: a local folder "
                   "with the diffusers configs of its family")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")


def _load(args):
    from .loading import load_pipeline

    return load_pipeline(args.model, device=args.device, dtype=args.dtype, config=args.model_config)


def _positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (a bad value is a usage error, before anything is loaded or created)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _writable_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".erasekit-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {str(path)!r}: {e.strerror}") from None
    return path


def _parse_adapter(spec: str) -> tuple[str, float]:
    """'path.safetensors[:weight]' → (path, weight)."""
    path, _, weight = spec.rpartition(":") if spec.rpartition(":")[2].replace(".", "", 1).lstrip("-").isdigit() else (spec, "", "1")
    try:
        return path, float(weight)
    except ValueError:
        raise ConfigError(f"--adapter {spec!r}: expected PATH or PATH:WEIGHT") from None


# ------------------------------------------------------------------------------------------- erase

def erase_command(args, method_spec) -> int:
    import time

    from ._cli_config import config_from_args, read_toml

    file_values = read_toml(args.config) if args.config else {}
    from .tinyworld import is_tinyworld

    on_tinyworld = args.model is None or is_tinyworld(args.model)
    config = config_from_args(method_spec.config_cls, args, file_values, method_spec.preset(on_tinyworld))
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {str(out)!r}")
    _writable_dir(out.parent if str(out.parent) else ".")
    pipe = _load(args)
    started = time.perf_counter()
    adapter = method_spec.erase(pipe, config)
    seconds = time.perf_counter() - started
    adapter.save(out, dtype=_save_dtype(args.save_dtype))
    print(f"erased {', '.join(config.concepts)} with {method_spec.name} in {seconds:.2f} s "
          f"→ {out} ({out.stat().st_size / 1e6:.2f} MB, {len(adapter.deltas)} modules)")
    return 0


def _save_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16}[name]


def _erase_parser(method: str | None) -> tuple[argparse.ArgumentParser, object]:
    from ._cli_config import add_config_arguments

    p = argparse.ArgumentParser(prog="erasekit erase", description="Erase concepts; write one adapter file.",
                                epilog=EXAMPLES["erase"], formatter_class=argparse.RawDescriptionHelpFormatter)
    spec = None
    from .methods import METHODS

    p.add_argument("--method", required=True, choices=sorted(METHODS), help="erasure strategy")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--config", default=None, help="TOML file of method options (flags override it)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16"], help="tensor dtype in the file")
    _add_runtime(p)
    if method is not None:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
        spec = METHODS[method]
        add_config_arguments(p, spec.config_cls, spec.defaults)
    return p, spec


# ---------------------------------------------------------------------------------------- generate

def generate_command(args) -> int:
    from .generate import contact_sheet, generate

    pipe = _load(args)
    if args.adapter:
        from . import compose

        for spec in args.adapter:
            path, weight = _parse_adapter(spec)
            compose.load(pipe, path, weight=weight)
    prompts = [p for p in args.prompt for _ in args.seed]
    seeds = [s for _ in args.prompt for s in args.seed]
    images = generate(pipe, prompts, seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      negative_prompt=args.negative_prompt, progress=len(prompts) > 8)
    if args.out and len(images) == 1:
        out = Path(args.out)
        _writable_dir(out.parent if str(out.parent) else ".")
        images[0].save(out)
        written = [out]
    else:
        folder = _writable_dir(args.out_dir or (Path(args.out).with_suffix("") if args.out else "erasekit-out"))
        written = []
        for k, (im, p, s) in enumerate(zip(images, prompts, seeds)):
            path = folder / f"{k:03d}-seed{s}-{'_'.join(p.split())[:60]}.png"
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
    from . import tinyworld
    from .loading import model_path

    folder = Path(model_path(args.model))
    if not (folder / "judge").is_dir():
        raise ConfigError("--judge needs a tinyworld model (its judge ships beside it); for real models use "
                          "`erasekit audit --judge clip|nudenet`")
    judgement = tinyworld.load_judge(folder)(images)
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
    from .adapter import load_adapter

    adapter = load_adapter(args.adapter)
    size = Path(args.adapter).stat().st_size
    if args.json:
        print(json.dumps(adapter.describe() if hasattr(adapter, "describe") else _describe(adapter, size), indent=2))
        return 0
    d = _describe(adapter, size)
    print(f"{args.adapter}: {d['method']} erasing {', '.join(d['concepts'])}")
    print(f"  base model : {d['base_model'] or '(not recorded)'}")
    print(f"  components : {', '.join(d['components'])}   gating: {d['gating'].get('rule')}")
    print(f"  size       : {size / 1e6:.3f} MB, {d['parameters']:,} parameters in {len(d['modules'])} modules")
    print(f"  config     : {json.dumps(d['config'], sort_keys=True)}")
    if d["info"]:  # what the erase recorded: rank, training losses and time, RECE's kept epoch, ...
        print(f"  record     : {json.dumps(d['info'], sort_keys=True)}")
    if d["stats"]:
        print(f"  stats      : {', '.join(d['stats'])} (exact merging)")
    for m in d["modules"]:
        print(f"    {m['module']:<80} {m['kind']:<8} rank {m['rank'] if m['rank'] is not None else '-':<4} {m['shape']}")
    return 0


def _describe(adapter, size: int) -> dict:
    return {
        "method": adapter.method, "concepts": list(adapter.concepts), "base_model": adapter.base_model,
        "components": list(adapter.components), "gating": adapter.gating, "config": adapter.config,
        "parameters": adapter.num_parameters, "bytes": size, "stats": sorted(adapter.stats), "info": adapter.info,
        "modules": [{"module": k, "kind": "lowrank" if d.delta is None else "full", "rank": d.rank,
                     "shape": list(d.weight_shape)} for k, d in sorted(adapter.deltas.items())],
    }


# ------------------------------------------------------------------------------ export / fuse / merge

def export_command(args) -> int:
    from . import export
    from .adapter import load_adapter

    adapter = load_adapter(args.adapter)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {str(out)!r}")
    _writable_dir(out.parent if str(out.parent) else ".")
    write = export.to_diffusers if args.to == "diffusers" else export.to_kohya
    write(adapter, out, svd_rank=args.svd_rank)
    print(f"wrote {out} ({args.to} LoRA layout, {out.stat().st_size / 1e6:.2f} MB)")
    return 0


def fuse_command(args) -> int:
    from . import export

    pipe = _load(args)
    adapters = [_parse_adapter(spec) for spec in args.adapter]
    _writable_dir(Path(args.out).parent)
    out = export.bake(pipe, adapters, args.out, overwrite=args.overwrite)
    print(f"wrote a {type(pipe).__name__} folder with {len(adapters)} erasure(s) fused: {out}")
    return 0


def merge_command(args) -> int:
    from .adapter import load_adapter
    from .merge import can_merge_exactly, merge

    adapters = [load_adapter(path) for path in args.adapters]
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {str(out)!r}")
    _writable_dir(out.parent if str(out.parent) else ".")
    exact = can_merge_exactly(adapters, args.weights) and not args.stack
    pipe = _load(args) if exact else None
    merged = merge(adapters, pipe=pipe, weights=args.weights, exact=exact)
    merged.save(out)
    print(f"merged {len(adapters)} adapters ({merged.info['merge']}): {', '.join(merged.concepts)} → {out}")
    return 0


def audit_command(args) -> int:
    from . import compose
    from .attacks import ATTACKS
    from .audit import audit

    attacks = sorted(ATTACKS) if args.attack == ["all"] else args.attack
    unknown = [a for a in attacks if a.split(":")[0] not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attack {unknown[0]!r}; choose from: all, {', '.join(sorted(ATTACKS))}")
    prompts = None
    if args.prompts:
        from .attacks._concepts import read_lines

        prompts = read_lines(args.prompts)
    _writable_dir(args.out_dir)
    pipe = _load(args)
    for spec in args.adapter:
        path, weight = _parse_adapter(spec)
        compose.load(pipe, path, weight=weight)
    report = audit(pipe, args.concept, attacks, prompts=prompts, seeds=args.seed, judge=args.judge,
                   out_dir=args.out_dir, budget=args.budget, batch_size=args.batch_size)
    if report is not None:
        print(report)
        print(f"report: {report.report_md} · {report.report_html}")
    return 0


# --------------------------------------------------------------------------------------- tinyworld

def tinyworld_command(args) -> int:
    if args.tinyworld_command == "train":
        from .tinyworld.train import TrainConfig, train

        config = TrainConfig(seed=args.seed, unet_steps=args.unet_steps, n_images=args.n_images)
        manifest = train(args.out, args.work, config)
        print(json.dumps(manifest, indent=2))
        return 0
    if args.tinyworld_command == "render":
        import random

        from .tinyworld import world

        scene = _scene_from_prompt(args.prompt)
        from PIL import Image

        Image.fromarray(world.render(scene, random.Random(args.seed))).save(args.out)
        print(f"rendered {scene} → {args.out}")
        return 0
    # eval
    from . import tinyworld
    from .tinyworld.eval import QUALITY_BARS, quality

    pipe = _load(args)
    judge = tinyworld.load_judge(Path(_model_folder(args)))
    results = quality(pipe, judge, seeds=tuple(args.seeds))
    rows, ok = [], True
    print(f"{'prompts':<20} {'attribute':<11} {'accuracy':>9} {'bar':>6}")
    for kind, values in results.items():
        for attribute, value in values.items():
            if attribute == "images":
                continue
            bar = QUALITY_BARS.get((kind, attribute))
            passed = bar is None or value >= bar
            ok &= passed
            rows.append({"prompts": kind, "attribute": attribute, "accuracy": value, "bar": bar, "passed": passed})
            print(f"{kind:<20} {attribute:<11} {value:>9.3f} {'' if bar is None else f'{bar:.2f}':>6} {'' if passed else 'FAIL'}")
    if args.out:
        from .bench_utils import run_record

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"run": run_record(), "seeds": args.seeds, "results": results,
                                              "rows": rows, "all_bars_met": ok}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if ok else 1


def _model_folder(args) -> str:
    from .loading import model_path

    return model_path(args.model)


def _scene_from_prompt(prompt: str):
    from .tinyworld import world

    words = f" {prompt.lower()} "
    found = {}
    for attribute, table in world.ATTRIBUTES.items():
        for name, names in table.items():
            if any(f" {n} " in words for n in names):
                found[attribute] = name
    missing = [a for a in ("shape",) if a not in found]
    if missing:
        raise ConfigError(f"prompt {prompt!r} names no tinyworld shape; shapes: {', '.join(world.SHAPES)}")
    return world.Scene(found["shape"], found.get("colour", "red"), found.get("texture", "solid"),
                       found.get("background", "black"))


# -------------------------------------------------------------------------------------------- demo

def demo_command(args) -> int:
    """The main job on tinyworld: erase a concept, generate before/after, print what the judge sees."""
    import time

    from . import compose, tinyworld
    from .api import erase
    from .generate import contact_sheet, generate
    from .tinyworld.world import COLOURS, SHAPES, Scene, canonical, concept_attribute, synonyms

    concept = canonical(args.concept) if args.concept else "circle"
    attribute = concept_attribute(concept)
    folder = _writable_dir(args.out_dir)
    pipe = _load(args)
    judge = tinyworld.load_judge(Path(_model_folder(args)))
    base = [Scene(s, c, "solid", "black") for s in SHAPES for c in COLOURS]
    target = [sc for sc in base if getattr(sc, attribute) == concept]
    others = [sc for sc in base if getattr(sc, attribute) != concept][:: max(1, len(base) // 24)]
    names = synonyms(concept)
    rows = [(f"{concept!r} prompts", target, {}), *[(f"via synonym {w!r}", target, {attribute: w}) for w in names[1:]],
            (f"other {attribute}s", others, None)]
    prompts = [sc.prompt(names=n or {}) for _, scenes, n in rows for sc in scenes]
    scenes = [sc for _, scenes, _ in rows for sc in scenes]
    seeds = list(args.seed)
    all_prompts = [p for p in prompts for _ in seeds]
    all_scenes = [sc for sc in scenes for _ in seeds]
    all_seeds = seeds * len(prompts)

    print(f"tinyworld: {len(all_prompts)} images before and after erasing {concept!r} with {args.method} …")
    before = generate(pipe, all_prompts, all_seeds)
    started = time.perf_counter()
    adapter = erase(pipe, args.method, [concept])
    seconds = time.perf_counter() - started
    adapter_path = folder / f"{concept}.{args.method}.safetensors"
    adapter.save(adapter_path)
    name = compose.load(pipe, adapter)
    after = generate(pipe, all_prompts, all_seeds)
    compose.unload(pipe, [name])

    def seen(images, scenes_):
        verdict = judge(images)
        return [lab == getattr(sc, attribute) for lab, sc in zip(verdict.labels(attribute), scenes_)], verdict

    ok_before, _ = seen(before, all_scenes)
    ok_after, _ = seen(after, all_scenes)
    print(f"\nerased {concept!r} in {seconds:.2f} s → {adapter_path} ({adapter_path.stat().st_size / 1e3:.0f} kB)\n")
    measures = [f"{label}: " + (f"{attribute} correct" if label == f"other {attribute}s" else f"{concept} seen")
                for label, _, _ in rows]
    width = max(len(m) for m in measures + ["what the judge sees"])  # one column, however long a synonym is
    print(f"{'what the judge sees':<{width}} {'before':>8} {'after':>8}")
    start = 0
    for what, (_, scenes_, _) in zip(measures, rows):
        n = len(scenes_) * len(seeds)
        b, a = sum(ok_before[start:start + n]), sum(ok_after[start:start + n])
        print(f"{what:<{width}} {f'{b}/{n}':>8} {f'{a}/{n}':>8}")
        start += n
    contact_sheet(before, columns=len(seeds) * 6).save(folder / "before.png")
    contact_sheet(after, columns=len(seeds) * 6).save(folder / "after.png")
    print(f"\nimages: {folder / 'before.png'}, {folder / 'after.png'}")
    return 0


# --------------------------------------------------------------------------------------------- env

def env_command(args) -> int:
    import platform

    import torch

    from . import __version__

    lines = {"erasekit": __version__, "python": platform.python_version(), "platform": platform.platform(),
             "torch": torch.__version__, "cuda available": torch.cuda.is_available()}
    for mod in ("diffusers", "transformers", "accelerate", "safetensors", "peft", "open_clip", "nudenet"):
        try:
            lines[mod] = __import__(mod).__version__
        except Exception:
            lines[mod] = "not installed"
    if torch.cuda.is_available():
        lines["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    from . import tinyworld

    lines["tinyworld"] = str(tinyworld.path()) + ("" if (tinyworld.path() / "model_index.json").exists() else " (missing!)")
    for k, v in lines.items():
        print(f"{k:<16} {v}")
    return 0


def bench_command(args) -> int:
    if args.target == "perf":
        from .perf import run_perf

        run_perf(args.out_dir, device=args.device, quick=args.quick)
        return 0
    from .bench import run_suite, table

    results = run_suite("quick" if args.quick else "full", args.out_dir, methods=args.methods, attacks=args.attacks,
                        entries=args.entries, work_dir=args.work, model=args.model, device=args.device)
    print(table(results))
    return 0


# -------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="erasekit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Erase concepts from text-to-image diffusion models as composable adapters; audit the result.",
        epilog="Every command defaults to the packaged tinyworld model. `erasekit COMMAND --help` for examples.")
    parser.add_argument("--version", action="version", version=f"erasekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    sub.add_parser("erase", help="erase concepts with a strategy; write an adapter", add_help=False)

    g = sub.add_parser("generate", help="generate images, optionally with adapters", epilog=EXAMPLES["generate"], formatter_class=fmt)
    g.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    g.add_argument("--seed", type=int, nargs="+", default=[0], help="one image per seed per prompt (default 0)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--adapter", action="append", default=[], help="adapter file, optionally PATH:WEIGHT (repeatable)")
    g.add_argument("--out", default=None, help="PNG path for a single image")
    g.add_argument("--out-dir", default=None, help="folder for several images and a contact sheet")
    g.add_argument("--judge", action="store_true", help="print what tinyworld's judge sees in each image")
    _add_runtime(g)

    i = sub.add_parser("inspect", help="print an adapter's record, modules, ranks and size", epilog=EXAMPLES["inspect"], formatter_class=fmt)
    i.add_argument("adapter")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    x = sub.add_parser("export", help="write a static adapter as a stock diffusers or kohya LoRA file",
                       epilog=EXAMPLES["export"], formatter_class=fmt)
    x.add_argument("adapter")
    x.add_argument("--to", required=True, choices=["diffusers", "kohya"], help="LoRA layout")
    x.add_argument("--out", required=True, help="file to write (.safetensors)")
    x.add_argument("--svd-rank", type=int, default=None, help="approximate full deltas at this rank (else refused)")

    f = sub.add_parser("fuse", help="bake adapters into the weights: a complete pipeline folder for deployment",
                       epilog=EXAMPLES["fuse"], formatter_class=fmt)
    f.add_argument("--adapter", action="append", required=True, metavar="PATH[:WEIGHT]", help="repeatable")
    f.add_argument("--out", required=True, help="pipeline folder to create")
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    _add_runtime(f)

    a = sub.add_parser("audit", help="attack an erased model with adversarial prompts; report what comes back",
                       epilog=EXAMPLES["audit"], formatter_class=fmt)
    a.add_argument("--adapter", action="append", default=[], metavar="PATH[:WEIGHT]", help="the erasure (repeatable)")
    a.add_argument("--concept", required=True, help="the erased concept")
    a.add_argument("--attack", nargs="+", default=["unlearndiffatk"], help="attack names (or 'all'), NAME:PRESET")
    a.add_argument("--prompts", default=None, help="text file of the concept's prompts (default: tinyworld's grid)")
    a.add_argument("--seed", type=int, nargs="+", default=[0])
    a.add_argument("--judge", default="tinyworld", choices=["tinyworld", "clip", "nudenet"])
    a.add_argument("--budget", default="auto", choices=["auto", "tinyworld", "paper"], help="attack presets")
    a.add_argument("--batch-size", type=_positive_int, default=1,
                   help="original/erased images generated per pipeline call (faster; 1 = bitwise resumable)")
    a.add_argument("--out-dir", required=True, help="results, images and report (rerun to resume)")
    _add_runtime(a)

    m = sub.add_parser("merge", help="merge adapters: exact re-solve (UCE/TIME with statistics) or weighted stack",
                       epilog=EXAMPLES["merge"], formatter_class=fmt)
    m.add_argument("adapters", nargs="+")
    m.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    m.add_argument("--weights", type=float, nargs="+", default=None, help="one per adapter (weighted stack)")
    m.add_argument("--stack", action="store_true", help="weighted stack even where an exact re-solve exists")
    _add_runtime(m)

    t = sub.add_parser("tinyworld", help="train, evaluate or render the tiny world", epilog=EXAMPLES["tinyworld"], formatter_class=fmt)
    tsub = t.add_subparsers(dest="tinyworld_command", metavar="SUBCOMMAND", required=True)
    tt = tsub.add_parser("train", help="regenerate data, model and judge from a seed (resumable)")
    tt.add_argument("--out", required=True, help="folder to write the pipeline + judge to")
    tt.add_argument("--work", required=True, help="folder for data and resumable checkpoints")
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--unet-steps", type=int, default=3000)
    tt.add_argument("--n-images", type=int, default=24000)
    te = tsub.add_parser("eval", help="the quality table: does the judge agree with the prompt?")
    te.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    te.add_argument("--out", default=None, help="JSON file for the results")
    _add_runtime(te)
    tr = tsub.add_parser("render", help="render the ground-truth image of a prompt")
    tr.add_argument("--prompt", required=True)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True)

    d = sub.add_parser("demo", help="erase a concept from tinyworld and show the judge's verdict before/after",
                       epilog=EXAMPLES["demo"], formatter_class=fmt)
    d.add_argument("--method", default="uce", help="erasure strategy (default: uce)")
    d.add_argument("--concept", default="circle", help="a tinyworld concept (default: circle)")
    d.add_argument("--seed", type=int, nargs="+", default=[0, 1], help="seeds per prompt (default: 0 1)")
    d.add_argument("--out-dir", default="erasekit-demo", help="where the adapter and before/after sheets go")
    _add_runtime(d)

    b = sub.add_parser("bench", help="benchmark every method on the tinyworld suite (or `bench perf`: speed/memory)",
                       epilog=EXAMPLES["bench"], formatter_class=fmt)
    b.add_argument("target", nargs="?", default="suite", choices=["suite", "perf"],
                   help="suite (default): erase + audit on tinyworld; perf: timing and memory on real-model shapes")
    b.add_argument("--quick", action="store_true", help="the quick budget (see erasekit.bench.BUDGETS)")
    b.add_argument("--methods", nargs="+", default=None, help="registry names (default: all)")
    b.add_argument("--attacks", nargs="+", default=None, help="attack names (default: all)")
    b.add_argument("--entries", nargs="+", default=None, help="suite entries: shape colour texture multi (default: all)")
    b.add_argument("--out-dir", default="benchmarks", help="where results.json / .md / .png go")
    b.add_argument("--work", default=None, help="cache of adapters and audits (default: OUT_DIR/.bench-BUDGET)")
    b.add_argument("--model", default=None, help="a tinyworld model folder (default: the packaged one)")
    b.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")

    sub.add_parser("env", help="versions and devices, for bug reports", epilog=EXAMPLES["env"], formatter_class=fmt)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    # transformers warns about optional image-processor backends on import; the CLI never uses them
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "erase":
            pre = argparse.ArgumentParser(add_help=False)
            pre.add_argument("--method", default=None)
            known, _ = pre.parse_known_args(argv[1:])
            parser, spec = _erase_parser(known.method)
            args = parser.parse_args(argv[1:])
            return erase_command(args, spec)
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "generate" and args.out and args.out_dir:
            raise ConfigError("give --out (one image) or --out-dir (several), not both")
        return {"generate": generate_command, "inspect": inspect_command, "export": export_command,
                "fuse": fuse_command, "merge": merge_command, "audit": audit_command, "tinyworld": tinyworld_command,
                "demo": demo_command, "env": env_command, "bench": bench_command}[args.command](args)
    except ErasekitError as e:
        print(f"erasekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("erasekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
