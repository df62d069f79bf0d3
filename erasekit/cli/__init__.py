"""The ``erasekit`` command line: parsing only. One function per command in :mod:`.commands`; heavy imports happen
inside commands so that ``erasekit --help`` is instant. User errors are ``ErasekitError``s, printed without a
traceback (exit 2).

Every option is checked before anything is loaded or created: argparse ``type=`` validators (:mod:`.types`, one per
kind of value, shared by every command) and each command's own checks before it loads the model; usage errors are
``ConfigError``s too, so any bad command line ends in one ``erasekit: error: ...`` line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..errors import ConfigError, ErasekitError
from .commands import (
    MAX_LOCAL_PROCESSES, audit_command, bench_command, demo_command, env_command, erase_command, erase_config, export_command,
    fuse_command, generate_command, inspect_command, merge_command, printable, tinyworld_command,
)
from .types import (
    ADAPTER_WEIGHT_LIMIT, DEFAULT_OUT_DIR, IMAGE_SUFFIXES, SEED_MAX, Parser, adapter_arg, finite_float, in_file,
    out_dir, out_file, positive_int, processes_count, seed, text,
)

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
  erasekit erase --method esd-x --concept circle --gate tokencos --out c.safetensors   # acts on circle prompts only
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
  erasekit tinyworld train --out ./tinyworld --work ./tinyworld-work   # ~47 min on 2 CPU cores, resumable
  erasekit tinyworld train --arch mmdit --out ./tinyworld-mmdit --work ./mmdit-work   # SD3's architecture
  erasekit tinyworld eval --model tinyworld-mmdit""",
    "env": "example:\n  erasekit env",
    "bench": """examples:
  erasekit bench --quick                     # every method (but advunlearn-fast) on the tinyworld suite, one process per core
  erasekit bench                             # the full suite (every entry, every attack)
  OMP_NUM_THREADS=1 erasekit bench --processes 1 --entries shape colour &
  OMP_NUM_THREADS=1 erasekit bench --processes 1 --entries texture multi
                                             # the full suite as two runs sharing one cache; then
  erasekit bench                             # assembles their rows into benchmarks/results-full.json
  erasekit bench --quick --methods uce spm --attacks unlearndiffatk p4d
  accelerate launch --multi_gpu --num_processes 4 -m erasekit.cli bench    # 4 GPUs share the rows (README: Scale)
  erasekit bench perf                        # erase time, training memory, composition overhead (SD 1.5 shapes)
  erasekit bench perf --only peft_compare    # one of them: erasekit against diffusers' PEFT, timed alternately""",
    "demo": """examples:
  erasekit demo                                  # UCE erases "circle" from tinyworld, judged before/after
  erasekit demo --method rece --concept red --out-dir demo-red""",
}

# -------------------------------------------------------------------------------------------- main

def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id, local diffusers folder, or single .safetensors/.ckpt "
                   "checkpoint (default: the packaged tinyworld)")
    p.add_argument("--model-config", default=None, help="for a single-file checkpoint offline: a local folder "
                   "with the diffusers configs of its family")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")


def erase_parser(method: str | None) -> tuple[argparse.ArgumentParser, object]:
    from .config import add_config_arguments
    from ..compose import GATE_METRICS
    from ..methods import METHODS

    methods = "\n".join(f"  {name:<17} {spec.summary}" for name, spec in METHODS.items())
    p = Parser(prog="erasekit erase", description="Erase concepts; write one adapter file.",
                epilog=f"methods:\n{methods}\n\n{EXAMPLES['erase']}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=sorted(METHODS), help="erasure strategy (see methods below)")
    p.add_argument("--out", required=True, type=out_file(".safetensors"), help="adapter file to write (.safetensors)")
    p.add_argument("--config", default=None, type=in_file, help="TOML file of method options (flags override it)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16"], help="tensor dtype in the file")
    p.add_argument("--gate", default=None, choices=GATE_METRICS, metavar="METRIC",
                   help="write the adapter gated by the prompt's similarity to its concepts (erasekit.compose.gated: "
                   f"for composing many; one of {', '.join(GATE_METRICS)}); its deltas must be on the UNet or "
                   "transformer")
    _add_runtime(p)
    spec = None
    if method is not None:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
        spec = METHODS[method]
        add_config_arguments(p, spec.config_cls, spec.defaults)
    return p, spec


def _attack_lines() -> str:
    """One line per registered attack (``audit --help``): name, what it is, its presets."""
    from ..attacks import ATTACKS

    lines = []
    for name, module in ATTACKS.items():
        first = (module.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:<19} {first.split(' (')[0].rstrip('.')}; presets: {', '.join(module.PRESETS)}")
    return "\n".join(lines)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; ``command`` = the one being run, whose help may list a registry (``audit``:
    the attacks), imported only then so that ``erasekit --help`` stays instant."""
    from .. import __version__

    parser = Parser(
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
    a.add_argument("--base-cache", type=out_dir, default=None,
                   help="folder of base-model images that audits share (reused when model, prompt, seed and "
                        "settings match; images and records are the same as without it)")
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
    tt.add_argument("--arch", choices=["unet", "mmdit"], default="unet",
                    help="unet: SD 1.x's architecture (VAE, judge, encoder, UNet); mmdit: SD3's (a transformer and a "
                         "second encoder, trained on the packaged tinyworld's VAE, judge and encoder)")
    tt.add_argument("--steps", "--unet-steps", dest="steps", type=positive_int, default=3000,
                    help="optimisation steps of the denoiser (UNet or transformer)")
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
    b.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="bench perf: run only these (closed_form_perf train_memory compose_overhead peft_compare "
                        "uce_reference; default: all)")
    b.add_argument("--methods", nargs="+", default=None, help="registry names (default: all)")
    b.add_argument("--attacks", nargs="+", default=None, help="attack names (default: all)")
    b.add_argument("--entries", nargs="+", default=None, help="suite entries: shape colour texture multi composed gated (default: all)")
    b.add_argument("--out-dir", default="benchmarks", type=out_dir, help="where results.json / .md / .png go")
    b.add_argument("--work", default=None, type=out_dir,
                   help="cache of adapters and audits (default: OUT_DIR/.bench-BUDGET)")
    b.add_argument("--model", default=None, help="a tinyworld model folder (default: the packaged one)")
    b.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    b.add_argument("--processes", default="auto", type=processes_count,
                   help="suite: processes that share the rows on this machine (auto: one per CPU core, at most "
                        f"{MAX_LOCAL_PROCESSES}, on a CPU; one on a GPU; under a launcher, the launcher's)")

    sub.add_parser("env", help="versions and devices, for bug reports", epilog=EXAMPLES["env"], formatter_class=fmt)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns about optional image-processor backends on import; the CLI never uses them
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = list(sys.argv[1:] if argv is None else argv)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a `kill` unwinds like Ctrl-C: temporary files go
        signal.signal(signal.SIGTERM, _terminated)
    try:
        if argv and argv[0] == "erase":
            pre = Parser(add_help=False)
            pre.add_argument("--method", default=None)
            known, _ = pre.parse_known_args(argv[1:])
            parser, spec = erase_parser(known.method)
            args = parser.parse_args(argv[1:])
            return erase_command(args, spec)
        parser = build_parser(argv[0] if argv else None)
        args, extra = parser.parse_known_args(argv)
        if extra:
            command = f"erasekit {args.command}" if args.command else "erasekit"
            raise ConfigError(f"unrecognized arguments: {printable(' '.join(extra))} (see `{command} --help`)")
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
    except BrokenPipeError:  # the reader went away (`erasekit inspect x | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _terminated(signum, frame):
    raise KeyboardInterrupt


__all__ = ["ADAPTER_WEIGHT_LIMIT", "DEFAULT_OUT_DIR", "EXAMPLES", "IMAGE_SUFFIXES", "SEED_MAX", "adapter_arg",
           "build_parser", "erase_config", "erase_parser", "finite_float", "in_file", "main", "out_dir", "out_file",
           "positive_int", "seed", "text"]
