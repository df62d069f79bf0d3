"""An experiment toward issue #22 §2 (not a registered method): suppression in the image domain, whatever the text.

Every candidate so far changes what the UNet does *given a text*: ESD's targets are the frozen model's predictions
under the concept's prompt, an anchor's or an attacked one, so a conditioning the training never met (a soft prompt,
a learned token) can still reach a UNet that draws the concept. Here the UNet is taught, on noised images *of the
concept*, to denoise them into the same scene with the concept's partner (for circle the square UCE guides it to:
same place, size, colour, texture, background), under every kind of conditioning: the concept's captions (its
synonyms too), the partner's, no text, random token strings, and the concept's encodings with noise added in the
text encoder's output space. Noised images of the other values keep the frozen model's prediction under their own
captions (a distillation term). The target is Concept Ablation's image-level idea (Kumari et al., ICCV 2023:
the concept's distribution sent to an anchor's), made paired and text-independent: the x₀ the student should predict
from x_t = √ᾱ z_concept + √(1−ᾱ) ε is z_partner, i.e. ε* = ε + √ᾱ/√(1−ᾱ) (z_concept − z_partner), the loss weighted
min(1, (1−ᾱ)/ᾱ) so that the low-noise end (ε* large) does not dominate.

The trained modules are ESD-u's (every Linear/Conv2d weight outside cross-attention), full-rank; the deltas are
written as an adapter that ``robust_tinyworld.py --files`` judges alone (stacked with UCE's cross-attention edit it
erased less: the two maps fight and draw blobs).
Renders and their latents are made once in ``--work``; training is resumable (a checkpoint every 100 steps; the
adversary's warm starts live in memory and start again on a resume). With ``--adversary-steps`` a soft-prompt attack
on the student runs before each update (AdvUnlearn's inner maximisation) and its conditioning replaces the first
samples'. The row ``paired-square-adv-6000`` in ``robust_tinyworld.json`` (circle: union over the six attacks 0 %) is
3000 plain steps, then resumed to 6000 with ``--adversary-steps 10 --adversary-rows 1`` (stopped and resumed at 3600
and 4800).

    python benchmarks/paired_suppression_tinyworld.py circle OUT.safetensors --work DIR --steps 3000
    python benchmarks/paired_suppression_tinyworld.py circle OUT.safetensors --work DIR --steps 6000 \
        --adversary-steps 10 --adversary-rows 1
    python benchmarks/robust_tinyworld.py NAME --concepts circle --files OUT.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from erasekit.attacks.unlearndiffatk import SoftPromptConfig, soft_prompt_attack
from erasekit.core import sd
from erasekit.core.files import replacing
from erasekit.loading import load_pipeline
from erasekit.tinyworld import ATTRIBUTES, concept_attribute
from erasekit.tinyworld import model as M
from erasekit.tinyworld.world import Scene, caption, random_scene, render
from retrain_oracle_tinyworld import save_unet_weights  # this folder (the script's own) is on sys.path

#: conditioning kinds of the concept's samples and their shares (module docstring)
KINDS = {"concept": 0.35, "partner": 0.1, "empty": 0.15, "random_tokens": 0.2, "noisy_hidden": 0.2}


def trainable(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """ESD-u's modules: every Linear and Conv2d outside cross-attention."""
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".attn2." not in n}


def make_data(pipe, concept: str, partner: str, n: int, seed: int) -> dict:
    """``n`` scenes of the concept with their partner (same jitter: the same rng state renders both), and ``n``
    scenes of the attribute's other values, each encoded once by the frozen VAE (latent means, scaled)."""
    attribute = concept_attribute(concept)
    rng = random.Random(seed)
    pairs, keep, scenes = [], [], []
    for _ in tqdm(range(n), desc="render"):
        scene = dataclasses.replace(random_scene(rng), **{attribute: concept})
        state = rng.randrange(2**31)
        pairs.append((render(scene, random.Random(state)),
                      render(dataclasses.replace(scene, **{attribute: partner}), random.Random(state))))
        scenes.append(dataclasses.asdict(scene))
    others = []
    while len(keep) < n:
        scene = random_scene(rng)
        if getattr(scene, attribute) != concept:
            keep.append(render(scene, rng))
            others.append(dataclasses.asdict(scene))

    def encode(images):
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            z = torch.cat([pipe.vae.encode(x[i:i + 512]).latent_dist.mean for i in range(0, len(x), 512)])
        return z * pipe.vae.config.scaling_factor

    return {"concept": concept, "partner": partner, "n": n, "scenes": scenes, "others": others,
            "z_concept": encode([a for a, _ in pairs]), "z_partner": encode([b for _, b in pairs]),
            "z_keep": encode(keep)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("concept", choices=[v for values in ATTRIBUTES.values() for v in values],
                    metavar="CONCEPT", help="a tinyworld concept (canonical name: circle, red, striped, ...)")
    ap.add_argument("out")
    ap.add_argument("--work", required=True, help="folder for the renders and the resumable checkpoint")
    ap.add_argument("--partner", default="square", help="the value the concept's images are denoised into")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16, help="samples of the concept per step (as many kept)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--keep-weight", type=float, default=1.0, help="weight of the distillation on the other values")
    ap.add_argument("--hidden-noise", type=float, default=1.0, help="σ of the noise added to text encodings, "
                    "relative to their per-token scale")
    ap.add_argument("--min-t", type=int, default=0, help="the concept's samples draw t ≥ this")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adversary-steps", type=int, default=0,
                    help="steps of a soft-prompt attack on the student before each update (0: none); its "
                    "conditioning replaces the first --adversary-rows samples' (module docstring)")
    ap.add_argument("--adversary-rows", type=int, default=2)
    args = ap.parse_args()
    for name in ("steps", "batch_size", "lr", "images"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("keep_weight", "hidden_noise", "adversary_steps", "adversary_rows"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(args, name)}")
    if not 0 <= args.min_t < 1000:
        ap.error(f"--min-t must be in [0, 999], got {args.min_t}")
    if not args.out.endswith(".safetensors") or Path(args.out).is_dir():
        ap.error(f"OUT must be a .safetensors file to write, got {args.out!r}")
    attribute = concept_attribute(args.concept)
    if args.partner not in ATTRIBUTES[attribute] or args.partner == args.concept:
        ap.error(f"--partner must be another {attribute} than {args.concept!r}: one of "
                 f"{[v for v in ATTRIBUTES[attribute] if v != args.concept]}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.pt"
    d = torch.load(data) if data.exists() else None
    if d is not None and (d["concept"], d["partner"], d["n"]) != (args.concept, args.partner, args.images):
        ap.error(f"{work} holds renders of {d['concept']!r} → {d['partner']!r} ({d['n']}); use another --work")
    pipe = load_pipeline(None, device="cpu")
    if d is None:
        d = make_data(pipe, args.concept, args.partner, args.images, args.seed)
        with replacing(data) as tmp:
            torch.save(d, tmp)
    scenes = [Scene(**s) for s in d["scenes"]]
    others = [Scene(**s) for s in d["others"]]

    base = sd.denoiser(pipe).requires_grad_(False)
    student = M.make_unet()
    student.load_state_dict(base.state_dict())
    trained = trainable(student)
    weights = {f"{n}.weight" for n in trained}
    for name, p in student.named_parameters():
        p.requires_grad_(name in weights)
    params = [m.weight for m in trained.values()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    alphas = M.make_train_scheduler().alphas_cumprod
    text = pipe.text_encoder.requires_grad_(False)
    tok = pipe.tokenizer
    ckpt, start, losses, spent, segments = work / "student.pt", 0, [], 0.0, []
    if ckpt.exists():
        state = torch.load(ckpt)
        student.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        start, losses, spent = state["step"], state["losses"], state["seconds"]
        segments = state.get("segments", [])
    started = time.time() - spent
    # each run's steps and settings: a resumed run may change the adversary or the weights, and the file says so
    segments.append({"from_step": start, "to_step": args.steps, "lr": args.lr, "keep_weight": args.keep_weight,
                     "hidden_noise": args.hidden_noise, "min_t": args.min_t,
                     "adversary_steps": args.adversary_steps, "adversary_rows": args.adversary_rows})

    def ids(prompt: str) -> list[int]:
        return tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids

    def encode(rows: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            return text(torch.tensor(rows))[0]

    kinds, shares = list(KINDS), list(KINDS.values())
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    vocab = [i for i in range(len(tok)) if i not in special]
    # the adversary (AdvUnlearn's inner maximisation, Zhang et al., NeurIPS 2024, Eq. 4): soft prompts that make the
    # *student* denoise the concept's image into itself, alternating UnlearnDiffAtk's threat (3 free token embeddings
    # before the caption) and P4D-N's (16 free token embeddings, no caption), each warm-started from its last round
    student_pipe = type(pipe)(**{**pipe.components, "unet": student})
    threats = {"prefix": SoftPromptConfig(k=3, insertion="prefix_k", space="word_embedding", lr=1e-2,
                                          steps=args.adversary_steps, timesteps="random"),
               "replace": SoftPromptConfig(k=16, insertion="replace_k", space="word_embedding", lr=1e-2,
                                           steps=args.adversary_steps, timesteps="random")}
    warm: dict[str, torch.Tensor | None] = {"prefix": None, "replace": None}
    bar = tqdm(range(start, args.steps), desc="paired", initial=start, total=args.steps, mininterval=2)
    for step in bar:
        gen = torch.Generator().manual_seed(1_000_003 * step + 11)
        rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
        b = args.batch_size
        idx = torch.randint(0, d["n"], (b,), generator=gen)
        # the concept's samples, each under a conditioning of one kind, encoded in one batch
        rows, noisy = [], []
        for j, i in enumerate(idx.tolist()):
            kind = rng.choices(kinds, shares)[0]
            scene = scenes[i]
            if kind in ("concept", "noisy_hidden"):
                rows.append(ids(caption(scene, rng)))
            elif kind == "partner":
                rows.append(ids(caption(dataclasses.replace(scene, **{attribute: args.partner}), rng)))
            elif kind == "empty":
                rows.append(ids(""))
            else:
                row = [tok.bos_token_id, *rng.choices(vocab, k=rng.randint(1, 12)), tok.eos_token_id]
                rows.append(row + [tok.pad_token_id] * (77 - len(row)))
            if kind == "noisy_hidden":
                noisy.append(j)
        ctx = encode(rows)
        for j in noisy:
            ctx[j] += args.hidden_noise * ctx[j].std(dim=-1, keepdim=True) * torch.randn(ctx[j].shape, generator=gen)
        if args.adversary_steps:
            kind = "prefix" if step % 2 == 0 else "replace"
            student.requires_grad_(False)
            for row in range(min(args.adversary_rows, b)):
                soft = soft_prompt_attack(student_pipe, caption(scenes[idx[row]], rng), config=threats[kind],
                                          target_latents=d["z_concept"][idx[row]][None], init=warm[kind],
                                          generator=gen)
                warm[kind] = soft.delta
                with torch.no_grad():
                    ctx[row] = soft.cond(student_pipe).embeds[0]
            for name, p in student.named_parameters():
                p.requires_grad_(name in weights)
        zc, zp = d["z_concept"][idx], d["z_partner"][idx]
        noise = torch.randn(zc.shape, generator=gen)
        t = torch.randint(args.min_t, 1000, (b,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * zc + (1 - a).sqrt() * noise
        target = noise + (a / (1 - a)).sqrt() * (zc - zp)
        w = torch.clamp((1 - a) / a, max=1.0)
        loss_erase = (w * (student(xt, t, ctx).sample - target) ** 2).mean()
        # the other values, held at the frozen model's prediction under their own captions
        kidx = torch.randint(0, len(others), (b,), generator=gen)
        kctx = encode([ids(caption(others[i], rng) if rng.random() >= 0.1 else "") for i in kidx.tolist()])
        zk = d["z_keep"][kidx]
        kt = torch.randint(0, 1000, (b,), generator=gen)
        ka = alphas[kt].view(-1, 1, 1, 1)
        kx = ka.sqrt() * zk + (1 - ka).sqrt() * torch.randn(zk.shape, generator=gen)
        with torch.no_grad():
            held = base(kx, kt, kctx).sample
        loss_keep = F.mse_loss(student(kx, kt, kctx).sample, held)
        loss = loss_erase + args.keep_weight * loss_keep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append((float(loss_erase), float(loss_keep)))
        if step % 10 == 0:
            e, k = np.mean(losses[-50:], axis=0)
            bar.set_postfix(erase=f"{e:.4f}", keep=f"{k:.5f}")
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            with replacing(ckpt) as tmp:
                torch.save({"unet": student.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                            "losses": losses, "seconds": time.time() - started, "segments": segments}, tmp)

    e, k = np.mean(losses[-50:], axis=0)
    info = {"paired_suppression": {"script": "benchmarks/paired_suppression_tinyworld.py", "concept": args.concept,
                                   "partner": args.partner, "steps": args.steps, "batch_size": args.batch_size,
                                   "lr": args.lr, "keep_weight": args.keep_weight, "hidden_noise": args.hidden_noise,
                                   "min_t": args.min_t, "images": args.images, "kinds": KINDS,
                                   "adversary_steps": args.adversary_steps, "adversary_rows": args.adversary_rows,
                                   "segments": segments,
                                   "loss_erase_last_50": float(e), "loss_keep_last_50": float(k),
                                   "seconds": round(time.time() - started)}}
    save_unet_weights(pipe, "paired-suppression", args.concept, {n: m.weight for n, m in trained.items()}, args.out,
                      info)


if __name__ == "__main__":
    main()
