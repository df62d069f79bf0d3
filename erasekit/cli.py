"""The ``erasekit`` command line. One function per command; heavy imports happen inside commands so that
``erasekit --help`` is instant. User errors are ``ErasekitError``s, printed without a traceback (exit 2).

Every option is checked before anything is loaded or created: argparse ``type=`` validators below (one per kind
of value, shared by every command) and each command's own checks before its ``_load``; usage errors are
``ConfigError``s too, so any bad command line ends in one ``erasekit: error: ...`` line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

from .errors import ConfigError, ErasekitError, UnknownConceptError

EXAMPLES = {
    "export": """examples:
  erasekit export circle.safetensors --to diffusers --out circle-lora.safetensors   # pipe.load_lora_weights(...)
  erasekit export circle.safetensors --to kohya --out circle-kohya.safetensors      # A1111 / ComfyUI""",
    "fuse": """examples:
  erasekit fuse --adapter circle.safetensors --out ./tinyworld-no-circle
  erasekit fuse --model ./my-sd15 --adapter nudity.safetensors --adapter logo.safetensors:0.8 --out ./sd15-safe""",
    "audit": """examples:
  erasekit audit --adapter circle.safetensors --concept circle --attack unlearndiffatk --out-dir audit/
  erasekit audit --adapter circle.safetensors --concept circle --attack all --out-dir audit/   # ~2 min, 2 CPU cores
  erasekit audit --adapter circle.safetensors --concept circle --attack all --full-grid --seed 0 1 --out-dir audit/
  accelerate launch -m erasekit.cli audit ...      # prompts split over processes; rerun to resume""",
    "merge": """examples:
  erasekit merge circle.safetensors red.safetensors --out both.safetensors     # UCE/TIME with --save-stats: exact joint re-solve
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


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; int64 everywhere a seed is stored
ADAPTER_WEIGHT_LIMIT = 100.0  # |w| of an adapter's PATH:WEIGHT; beyond it the image is noise, never an erasure
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_OUT_DIR = "erasekit-out"


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors raised as ``ConfigError``: one ``erasekit: error:`` line, exit 2."""

    def error(self, message):
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


# argparse types: each checks one kind of value and raises ArgumentTypeError, which argparse reports as
# "argument --flag: <message>"; none creates anything.

def positive_int(value: str) -> int:
    """An integer ≥ 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def finite_float(value: str) -> float:
    """A number that is neither nan nor ±inf."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return number


def seed(value: str) -> int:
    """An integer in [0, SEED_MAX]."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {value!r}") from None
    if not 0 <= number <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed is an integer from 0 to 2**63-1, got {number}")
    return number


def text(value: str) -> str:
    """Text that is valid UTF-8: argv bytes that are not arrive as lone surrogates, which can be neither printed,
    tokenised nor stored (paths are checked too: they are printed back)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not valid UTF-8: {value!r}") from None
    return value


def _creatable(folder: Path) -> None:
    """Raise unless ``folder`` exists or can be created, and files can be written in it."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # the root always exists
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write to output folder {str(folder)!r}: "
                                         f"{str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to output folder {str(folder)!r}: permission denied")


def out_dir(value: str) -> Path:
    """A folder to write into: an existing folder, or one that can be created (it is not created here)."""
    path = Path(text(value))
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a file, not a folder")
    _creatable(path)
    return path


def out_file(*suffixes: str):
    """A file to write, ending in one of ``suffixes``: not a folder, in a folder that exists or can be created."""
    def check(value: str) -> Path:
        path = Path(text(value))
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{value!r} must end in {' / '.join(suffixes)}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{value!r} is a folder; give a file name")
        _creatable(path.parent)
        return path
    return check


def in_file(value: str) -> Path:
    """An existing file."""
    path = Path(text(value))
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value!r} is a folder, not a file" if path.is_dir()
                                         else f"file not found: {value!r}")
    return path


def adapter_arg(value: str) -> tuple[Path, float]:
    """``PATH`` or ``PATH:WEIGHT`` → (an existing file, a finite weight with |w| ≤ ADAPTER_WEIGHT_LIMIT)."""
    path, weight = value, 1.0
    head, colon, tail = value.rpartition(":")
    if colon:
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass  # the ':' belongs to the file name
    if not (math.isfinite(weight) and abs(weight) <= ADAPTER_WEIGHT_LIMIT):
        raise argparse.ArgumentTypeError(f"{value!r}: the weight must be a number from -{ADAPTER_WEIGHT_LIMIT:g} "
                                         f"to {ADAPTER_WEIGHT_LIMIT:g}, got {tail!r}")
    return in_file(path), weight


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


def _make_dir(path: Path) -> Path:
    """Create an output folder (after the work that fills it, so a failed command leaves none behind)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {str(path)!r}: {e.strerror}") from None
    return path


def _printable(value) -> str:
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
    pipe = _load(args)
    started = time.perf_counter()
    adapter = method_spec.erase(pipe, config)
    seconds = time.perf_counter() - started
    _make_dir(out.parent)
    adapter.save(out, dtype=_save_dtype(args.save_dtype))
    print(f"erased {', '.join(config.concepts)} with {method_spec.name} in {seconds:.2f} s "
          f"→ {out} ({out.stat().st_size / 1e6:.2f} MB, {len(adapter.deltas)} modules)")
    return 0


def erase_config(args, method_spec):
    """The method's config from ``--config`` and the flags, built as ``erasekit.erase`` builds it (with the
    tinyworld preset when ``--model`` is a tinyworld model)."""
    from ._cli_config import config_from_args, read_toml
    from .tinyworld import is_tinyworld

    on_tinyworld = is_tinyworld(_model_folder(args))
    return config_from_args(method_spec, args, read_toml(args.config) if args.config else {}, on_tinyworld)


def _save_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16}[name]


def _erase_parser(method: str | None) -> tuple[argparse.ArgumentParser, object]:
    from ._cli_config import add_config_arguments
    from .methods import METHODS

    methods = "\n".join(f"  {name:<17} {spec.summary}" for name, spec in METHODS.items())
    p = _Parser(prog="erasekit erase", description="Erase concepts; write one adapter file.",
                epilog=f"methods:\n{methods}\n\n{EXAMPLES['erase']}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=sorted(METHODS), help="erasure strategy (see methods below)")
    p.add_argument("--out", required=True, type=out_file(".safetensors"), help="adapter file to write (.safetensors)")
    p.add_argument("--config", default=None, type=in_file, help="TOML file of method options (flags override it)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16"], help="tensor dtype in the file")
    _add_runtime(p)
    spec = None
    if method is not None:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
        spec = METHODS[method]
        add_config_arguments(p, spec.config_cls, spec.defaults)
    return p, spec


# ---------------------------------------------------------------------------------------- generate

def generate_command(args) -> int:
    from .generate import contact_sheet, generate

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
        from . import compose

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
    from . import tinyworld

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
    from .adapter import load_adapter

    adapter = load_adapter(args.adapter)
    size = Path(args.adapter).stat().st_size
    if args.json:
        print(json.dumps(adapter.describe() if hasattr(adapter, "describe") else _describe(adapter, size), indent=2))
        return 0
    d = _describe(adapter, size)
    lines = [f"{args.adapter}: {d['method']} erasing {', '.join(d['concepts'])}",
             f"  base model : {d['base_model'] or '(not recorded)'}",
             f"  components : {', '.join(d['components'])}   gating: {d['gating'].get('rule')}",
             f"  size       : {size / 1e6:.3f} MB, {d['parameters']:,} parameters in {len(d['modules'])} modules",
             f"  config     : {json.dumps(d['config'], sort_keys=True)}"]
    if d["info"]:  # what the erase recorded: rank, training losses and time, RECE's kept epoch, ...
        lines.append(f"  record     : {json.dumps(d['info'], sort_keys=True)}")
    if d["stats"]:
        lines.append(f"  stats      : {', '.join(d['stats'])} (exact merging)")
    for m in d["modules"]:
        lines.append(f"    {m['module']:<80} {m['kind']:<8} rank {m['rank'] if m['rank'] is not None else '-':<4} "
                     f"{m['shape']}")
    print("\n".join(_printable(line) for line in lines))  # the file's strings are data, not terminal commands
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
    write = export.to_diffusers if args.to == "diffusers" else export.to_kohya
    with warnings.catch_warnings(record=True) as caught:  # what the export did (e.g. exact full-rank factors)
        warnings.simplefilter("always")
        write(adapter, args.out, svd_rank=args.svd_rank)
    for w in caught:
        print(f"erasekit: note: {w.message}", file=sys.stderr)
    print(f"wrote {args.out} ({args.to} LoRA layout, {args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


def fuse_command(args) -> int:
    from . import export

    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise ConfigError(f"--out {str(args.out)!r} is a folder that is not empty; --overwrite replaces it")
    pipe = _load(args)
    out = export.bake(pipe, args.adapter, args.out, overwrite=args.overwrite)
    print(f"wrote a {type(pipe).__name__} folder with {len(args.adapter)} erasure(s) fused: {out}")
    return 0


def merge_command(args) -> int:
    from .adapter import load_adapter
    from .merge import can_merge_exactly, merge

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
    from . import compose
    from .attacks import ATTACKS
    from .audit import audit

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
        from .attacks._concepts import read_lines

        prompts = read_lines(args.prompts)
    else:
        _tinyworld_concept(args.concept, "; for another concept give --prompts FILE")
    pipe = _load(args)
    for path, weight in args.adapter:
        compose.load(pipe, path, weight=weight)
    report = audit(pipe, args.concept, attacks, prompts=prompts, seeds=args.seed, judge=args.judge,
                   out_dir=args.out_dir, budget=args.budget, batch_size=args.batch_size, full_grid=args.full_grid)
    if report is not None:
        print(report)
        print(f"report: {report.report_md} · {report.report_html}")
    return 0


def _attack_lines() -> str:
    """One line per registered attack (``audit --help``): name, what it is, its presets."""
    from .attacks import ATTACKS

    lines = []
    for name, module in ATTACKS.items():
        first = (module.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:<19} {first.split(' (')[0].rstrip('.')}; presets: {', '.join(module.PRESETS)}")
    return "\n".join(lines)


def _tinyworld_concept(concept: str, hint: str = "") -> str:
    """The canonical name of a tinyworld concept or synonym; UnknownConceptError names the known ones."""
    from .tinyworld.world import canonical

    try:
        return canonical(concept)
    except KeyError as e:
        raise UnknownConceptError(f"{e.args[0]}{hint}") from None


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

        image = Image.fromarray(world.render(scene, random.Random(args.seed)))
        _make_dir(args.out.parent)
        image.save(args.out)
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
        from .core.provenance import run_record

        _make_dir(args.out.parent)
        args.out.write_text(json.dumps({"run": run_record(), "seeds": args.seeds, "results": results,
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
    from .methods import METHODS
    from .tinyworld.world import COLOURS, SHAPES, Scene, concept_attribute, synonyms

    if args.method not in METHODS:
        raise ConfigError(f"unknown method {args.method!r}; choose one of: {', '.join(sorted(METHODS))}")
    concept = _tinyworld_concept(args.concept)
    attribute = concept_attribute(concept)
    folder = args.out_dir
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
    adapter_path = _make_dir(folder) / f"{concept}.{args.method}.safetensors"
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
        from .bench import run_perf

        run_perf(args.out_dir, device=args.device, quick=args.quick)
        return 0
    from .bench import run_suite, table

    results = run_suite("quick" if args.quick else "full", args.out_dir, methods=args.methods, attacks=args.attacks,
                        entries=args.entries, work_dir=args.work, model=args.model, device=args.device)
    print(table(results))
    return 0


# -------------------------------------------------------------------------------------------- main

def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; ``command`` = the one being run, whose help may list a registry (``audit``:
    the attacks), imported only then so that ``erasekit --help`` stays instant."""
    from . import __version__

    parser = _Parser(
        prog="erasekit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Erase concepts from text-to-image diffusion models as composable adapters; audit the result.",
        epilog="Every command defaults to the packaged tinyworld model. `erasekit COMMAND --help` for examples.")
    parser.add_argument("--version", action="version", version=f"erasekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter
    weight = f"PATH:WEIGHT scales it by WEIGHT, from -{ADAPTER_WEIGHT_LIMIT:g} to {ADAPTER_WEIGHT_LIMIT:g} (default 1)"

    sub.add_parser("erase", help="erase concepts with a strategy; write an adapter", add_help=False)

    g = sub.add_parser("generate", help="generate images, optionally with adapters", epilog=EXAMPLES["generate"], formatter_class=fmt)
    g.add_argument("--prompt", action="append", required=True, type=text, help="prompt (repeatable)")
    g.add_argument("--seed", type=seed, nargs="+", default=[0], help="one image per seed per prompt (default 0)")
    g.add_argument("--steps", type=positive_int, default=None, help="denoising steps, ≥ 1 (default: the model's)")
    g.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--negative-prompt", type=text, default=None)
    g.add_argument("--adapter", action="append", type=adapter_arg, default=[], metavar="PATH[:WEIGHT]",
                   help=f"adapter file (repeatable); {weight}")
    outs = g.add_mutually_exclusive_group()
    outs.add_argument("--out", type=out_file(*IMAGE_SUFFIXES), default=None,
                      help=f"image file for a single image ({', '.join(IMAGE_SUFFIXES)})")
    outs.add_argument("--out-dir", type=out_dir, default=None,
                      help=f"folder for the images and a contact sheet (default: {DEFAULT_OUT_DIR})")
    g.add_argument("--judge", action="store_true", help="print what tinyworld's judge sees in each image")
    _add_runtime(g)

    i = sub.add_parser("inspect", help="print an adapter's record, modules, ranks and size", epilog=EXAMPLES["inspect"], formatter_class=fmt)
    i.add_argument("adapter", type=in_file)
    i.add_argument("--json", action="store_true", help="machine-readable output")

    x = sub.add_parser("export", help="write a static adapter as a stock diffusers or kohya LoRA file",
                       epilog=EXAMPLES["export"], formatter_class=fmt)
    x.add_argument("adapter", type=in_file)
    x.add_argument("--to", required=True, choices=["diffusers", "kohya"], help="LoRA layout")
    x.add_argument("--out", required=True, type=out_file(".safetensors"), help="file to write (.safetensors)")
    x.add_argument("--svd-rank", type=positive_int, default=None, help="factor full deltas at this rank, approximately (default: exact full-rank factors)")

    f = sub.add_parser("fuse", help="bake adapters into the weights: a complete pipeline folder for deployment",
                       epilog=EXAMPLES["fuse"], formatter_class=fmt)
    f.add_argument("--adapter", action="append", type=adapter_arg, required=True, metavar="PATH[:WEIGHT]",
                   help=f"repeatable; {weight}")
    f.add_argument("--out", required=True, type=out_dir, help="pipeline folder to create")
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    _add_runtime(f)

    a = sub.add_parser("audit", help="attack an erased model with adversarial prompts; report what comes back",
                       epilog=(f"attacks (--attack NAME or NAME:PRESET; 'all' = every one):\n{_attack_lines()}\n\n"
                               if command == "audit" else "") + EXAMPLES["audit"], formatter_class=fmt)
    a.add_argument("--adapter", action="append", type=adapter_arg, default=[], metavar="PATH[:WEIGHT]",
                   help=f"the erasure (repeatable); {weight}")
    a.add_argument("--concept", required=True, type=text, help="the erased concept")
    a.add_argument("--attack", nargs="+", type=text, default=["unlearndiffatk"],
                   help="attack names (listed below) or 'all'; NAME:PRESET picks a preset")
    a.add_argument("--prompts", type=in_file, default=None,
                   help="text file of the concept's prompts (default on tinyworld: 4 prompts spread over its grid)")
    a.add_argument("--full-grid", action="store_true",
                   help="tinyworld: audit all of the concept's grid prompts (24-36, about 5x the work) instead of 4")
    a.add_argument("--seed", type=seed, nargs="+", default=[0])
    a.add_argument("--judge", default="tinyworld", choices=["tinyworld", "clip", "nudenet"])
    a.add_argument("--budget", default="auto", choices=["auto", "tinyworld", "paper"], help="attack presets")
    a.add_argument("--batch-size", type=positive_int, default=1,
                   help="original/erased images generated per pipeline call (faster; 1 = bitwise resumable)")
    a.add_argument("--out-dir", required=True, type=out_dir, help="results, images and report (rerun to resume)")
    _add_runtime(a)

    m = sub.add_parser("merge", help="merge adapters: exact re-solve (UCE/TIME with statistics) or weighted stack",
                       epilog=EXAMPLES["merge"], formatter_class=fmt)
    m.add_argument("adapters", nargs="+", type=in_file)
    m.add_argument("--out", required=True, type=out_file(".safetensors"), help="adapter file to write (.safetensors)")
    m.add_argument("--weights", type=finite_float, nargs="+", default=None, help="one per adapter (weighted stack)")
    m.add_argument("--stack", action="store_true", help="weighted stack even where an exact re-solve exists")
    _add_runtime(m)

    t = sub.add_parser("tinyworld", help="train, evaluate or render the tiny world", epilog=EXAMPLES["tinyworld"], formatter_class=fmt)
    tsub = t.add_subparsers(dest="tinyworld_command", metavar="SUBCOMMAND", required=True)
    tt = tsub.add_parser("train", help="regenerate data, model and judge from a seed (resumable)")
    tt.add_argument("--out", required=True, type=out_dir, help="folder to write the pipeline + judge to")
    tt.add_argument("--work", required=True, type=out_dir, help="folder for data and resumable checkpoints")
    tt.add_argument("--seed", type=seed, default=0)
    tt.add_argument("--unet-steps", type=positive_int, default=3000)
    tt.add_argument("--n-images", type=positive_int, default=24000)
    te = tsub.add_parser("eval", help="the quality table: does the judge agree with the prompt?")
    te.add_argument("--seeds", type=seed, nargs="+", default=[0, 1, 2, 3])
    te.add_argument("--out", type=out_file(".json"), default=None, help="JSON file for the results")
    _add_runtime(te)
    tr = tsub.add_parser("render", help="render the ground-truth image of a prompt")
    tr.add_argument("--prompt", required=True, type=text)
    tr.add_argument("--seed", type=seed, default=0)
    tr.add_argument("--out", required=True, type=out_file(*IMAGE_SUFFIXES), help="image file to write")

    d = sub.add_parser("demo", help="erase a concept from tinyworld and show the judge's verdict before/after",
                       epilog=EXAMPLES["demo"], formatter_class=fmt)
    d.add_argument("--method", default="uce", help="erasure strategy (default: uce)")
    d.add_argument("--concept", default="circle", type=text, help="a tinyworld concept (default: circle)")
    d.add_argument("--seed", type=seed, nargs="+", default=[0, 1], help="seeds per prompt (default: 0 1)")
    d.add_argument("--out-dir", default="erasekit-demo", type=out_dir,
                   help="where the adapter and before/after sheets go")
    _add_runtime(d)

    b = sub.add_parser("bench", help="benchmark every method on the tinyworld suite (or `bench perf`: speed/memory)",
                       epilog=EXAMPLES["bench"], formatter_class=fmt)
    b.add_argument("target", nargs="?", default="suite", choices=["suite", "perf"],
                   help="suite (default): erase + audit on tinyworld; perf: timing and memory on real-model shapes")
    b.add_argument("--quick", action="store_true", help="the quick budget (see erasekit.bench.BUDGETS)")
    b.add_argument("--methods", nargs="+", default=None, help="registry names (default: all)")
    b.add_argument("--attacks", nargs="+", default=None, help="attack names (default: all)")
    b.add_argument("--entries", nargs="+", default=None, help="suite entries: shape colour texture multi (default: all)")
    b.add_argument("--out-dir", default="benchmarks", type=out_dir, help="where results.json / .md / .png go")
    b.add_argument("--work", default=None, type=out_dir,
                   help="cache of adapters and audits (default: OUT_DIR/.bench-BUDGET)")
    b.add_argument("--model", default=None, help="a tinyworld model folder (default: the packaged one)")
    b.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")

    sub.add_parser("env", help="versions and devices, for bug reports", epilog=EXAMPLES["env"], formatter_class=fmt)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns about optional image-processor backends on import; the CLI never uses them
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "erase":
            pre = _Parser(add_help=False)
            pre.add_argument("--method", default=None)
            known, _ = pre.parse_known_args(argv[1:])
            parser, spec = _erase_parser(known.method)
            args = parser.parse_args(argv[1:])
            return erase_command(args, spec)
        parser = build_parser(argv[0] if argv else None)
        args, extra = parser.parse_known_args(argv)
        if extra:
            command = f"erasekit {args.command}" if args.command else "erasekit"
            raise ConfigError(f"unrecognized arguments: {_printable(' '.join(extra))} (see `{command} --help`)")
        if args.command is None:
            parser.print_help()
            return 0
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
