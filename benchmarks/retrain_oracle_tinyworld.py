"""The retrain oracle for issue #22 §2: a tinyworld UNet that never saw the concept, audited as an erasure.

Machine unlearning's reference point is the model retrained without the data to forget. Here: tinyworld's UNet
trained again from its initial weights (the same seed as the shipped one) on renders that never show the concept
(for circle: every scene of the five other shapes; the captions are tinyworld's training captions), with the shipped
text encoder and VAE frozen. Every Linear and Conv2d weight is trained from scratch; the other parameters (biases,
normalisation scales, which an adapter cannot carry) are the shipped model's, frozen. The trained weights minus the
shipped ones are written as an adapter of full deltas, so that `robust_tinyworld.py --files` audits the oracle as
it audits any erasure: the same prompts, seeds, judge and frozen attack presets, the original model being the
shipped one. What the attacks "bring back" from a model that cannot have the concept is what the judge calls the
concept in images that are not of it: the floor under every erasure's attack success rate on this judge.

Resumable (``--work``: a checkpoint every 250 steps); the training loss, step count and time are in the adapter's
``info``.

    python benchmarks/retrain_oracle_tinyworld.py circle OUT.safetensors --work DIR [--steps 3000]
    python benchmarks/robust_tinyworld.py retrain-oracle --concepts circle --files OUT.safetensors
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

from erasekit.adapter import Adapter, fingerprint
from erasekit.core import sd
from erasekit.core.files import replacing
from erasekit.core.lora import ModuleDelta
from erasekit.loading import load_pipeline
from erasekit.tinyworld import ATTRIBUTES, concept_attribute
from erasekit.tinyworld import model as M

from erasekit.tinyworld.train import TrainConfig, _cosine
from erasekit.tinyworld.world import Scene, caption, random_scene, render


def trainable(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules whose weight is trained from scratch (and written as a full delta): every Linear and Conv2d."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def save_unet_weights(pipe, method: str, concept: str, weights: dict[str, torch.Tensor], out: str, info: dict) -> None:
    """Write trained UNet weights (module name -> weight) as an adapter of full deltas against ``pipe``'s UNet, so that
    ``robust_tinyworld.py --files`` audits them as any erasure (also used by ``paired_suppression_tinyworld.py``)."""
    shipped = sd.denoiser(pipe).state_dict()
    deltas = {f"unet.{n}": ModuleDelta(delta=(w.detach() - shipped[f"{n}.weight"]).contiguous())
              for n, w in weights.items()}
    Adapter(method=method, concepts=(concept,), config={"concepts": [concept]}, deltas=deltas,
            base_model=sd.model_id(pipe), fingerprint=dict(fingerprint(pipe, ["unet"])), info=info).save(out)
    print("saved", out, info)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("concept", choices=[v for values in ATTRIBUTES.values() for v in values],
                    metavar="CONCEPT", help="a tinyworld concept (canonical name: circle, red, striped, ...)")
    ap.add_argument("out")
    ap.add_argument("--work", required=True, help="folder for the rendered data and the resumable checkpoint")
    defaults = TrainConfig()
    ap.add_argument("--steps", type=int, default=defaults.unet_steps)
    ap.add_argument("--images", type=int, default=defaults.n_images)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    args = ap.parse_args()
    for name in ("steps", "images", "batch_size"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not args.out.endswith(".safetensors") or Path(args.out).is_dir():
        ap.error(f"OUT must be a .safetensors file to write, got {args.out!r}")
    attribute = concept_attribute(args.concept)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.pt"
    d = torch.load(data) if data.exists() else None  # a folder made for another concept is refused before loading
    if d is not None and (d.get("concept") != args.concept or len(d["scenes"]) != args.images):
        ap.error(f"{work} holds {len(d['scenes'])} renders without {d.get('concept')!r}; "
                 f"use another --work for {args.images} without {args.concept!r}")
    pipe = load_pipeline(None, device="cpu")
    base = sd.denoiser(pipe)
    if d is None:  # renders of every other value of the attribute, encoded once by the frozen VAE
        rng, images, scenes = random.Random(defaults.seed), [], []
        with tqdm(total=args.images, desc="render") as bar:
            while len(images) < args.images:
                scene = random_scene(rng)
                if getattr(scene, attribute) == args.concept:
                    continue
                images.append(render(scene, rng))
                scenes.append(dataclasses.asdict(scene))
                bar.update()
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            posts = [pipe.vae.encode(x[i:i + 512]).latent_dist for i in tqdm(range(0, len(x), 512), desc="encode")]
        scale = pipe.vae.config.scaling_factor
        with replacing(data) as tmp:
            torch.save({"mean": torch.cat([p.mean for p in posts]) * scale,
                        "std": torch.cat([p.std for p in posts]) * scale, "scenes": scenes, "concept": args.concept}, tmp)
        d = torch.load(data)
    mean, std = d["mean"], d["std"]
    scenes = [Scene(**s) for s in d["scenes"]]

    torch.manual_seed(defaults.seed + 2)  # the shipped model's initial weights (its trainer draws these two first)
    M.make_text_encoder(len(pipe.tokenizer), pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id)
    unet = M.make_unet()
    trained = trainable(unet)
    weights = {f"{n}.weight" for n in trained}
    shipped = base.state_dict()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name not in weights:
                p.copy_(shipped[name])
            p.requires_grad_(name in weights)
    params = [m.weight for m in trained.values()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=defaults.lr, weight_decay=1e-2)
    alphas = M.make_train_scheduler().alphas_cumprod
    ckpt, start, losses, spent = work / "unet.pt", 0, [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt)
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        start, losses, spent = state["step"], state["losses"], state["seconds"]
    started = time.time() - spent  # the training time of every run so far
    text = pipe.text_encoder.requires_grad_(False)
    bar = tqdm(range(start, args.steps), desc="oracle unet", initial=start, total=args.steps, mininterval=2)
    for step in bar:
        gen = torch.Generator().manual_seed(1_000_003 * step + 7)
        for g in opt.param_groups:
            g["lr"] = defaults.lr * _cosine(step, args.steps)  # the shipped trainer's warmup and cosine decay
        idx = torch.randint(0, len(mean), (args.batch_size,), generator=gen)
        rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
        texts = [caption(scenes[i], rng) if rng.random() >= defaults.cond_dropout else "" for i in idx.tolist()]
        ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            context = text(ids)[0]
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(z0),), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))  # as the shipped model's EMA
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(float(loss))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % 250 == 0 or step + 1 == args.steps:
            with replacing(ckpt) as tmp:
                torch.save({"unet": unet.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step + 1,
                            "losses": losses, "seconds": time.time() - started}, tmp)

    info = {"retrain_oracle": {"script": "benchmarks/retrain_oracle_tinyworld.py", "concept": args.concept,
                               "attribute": attribute, "left_out": args.concept, "steps": args.steps,
                               "images": args.images, "batch_size": args.batch_size,
                               "loss_last_50": float(np.mean(losses[-50:])),
                               "seconds": round(time.time() - started),
                               "values": [v for v in ATTRIBUTES[attribute] if v != args.concept]}}
    save_unet_weights(pipe, "retrain-oracle", args.concept, {n: e for n, e in zip(trained, ema)}, args.out, info)


if __name__ == "__main__":
    main()
