"""tinyworld-mmdit: tinyworld's world drawn by Stable Diffusion 3's architecture at toy size.

An ``SD3Transformer2DModel`` (MMDiT: joint attention over 64 image tokens and the text tokens; Esser et al. 2024,
https://arxiv.org/abs/2403.03206) trained with rectified flow on the same rendered world as the UNet model,
with tinyworld's VAE and judge, two CLIP text encoders (``text_encoder`` is tinyworld's own encoder, frozen, so
that text-encoder adapters made on tinyworld apply unchanged; ``text_encoder_2`` starts from the same weights and
trains with the transformer) and no T5 (``StableDiffusion3Pipeline`` then appends 256 zero rows to the context;
training sees one row standing for 256, exactly: :mod:`erasekit.core.mmdit`).

Flow matching as in SD3 §2–3: x_t = (1 − σ) x_0 + σ ε with σ drawn logit-normal (m = 0, s = 1), the transformer
predicts v = ε − x_0 at timestep 1000 σ; generation with ``FlowMatchEulerDiscreteScheduler`` at SD3's shift 3 (more of
the steps at high noise, where the shape is decided: 88.9 % shapes right against 81.9 % at shift 1, 10 steps, on the
canonical grid), 20 steps, guidance 3. The folder is a ``StableDiffusion3Pipeline.save_pretrained`` layout plus
``judge/`` and ``tinyworld.json``.
"""

from __future__ import annotations

import copy
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from . import model as M
from .world import ATTRIBUTES, Scene, caption

#: the transformer's shape (see ``make_transformer``); 4 joint blocks × 128 wide, patch 1 on the 8 × 8 latents
WIDTH, LAYERS, HEADS = 128, 4, 4
#: rows of zeros StableDiffusion3Pipeline appends for its missing T5 (its ``max_sequence_length`` default)
T5_ROWS = 256

#: generation defaults written to ``tinyworld.json``. On the canonical grid (seed 0) guidance 3 beat 4 and 5 on every
#: attribute (shapes 94.4 / 94.2 / 93.1 %, textures 78.9 / 75.2 / 72.7 %); 2–2.5 gain textures and lose shapes
GENERATION = {"num_inference_steps": 20, "guidance_scale": 3.0}


@dataclass(frozen=True)
class MMDiTTrainConfig:
    """Args:
        seed: master seed (data, initialisation, every step's noise).
        n_images: size of the rendered training pool (the same pool as the UNet model's for the same seed).
        steps: optimisation steps of the transformer (and ``text_encoder_2``).
        batch_size, lr: batch size and peak learning rate (cosine decay after a 100-step warm-up).
        cond_dropout: probability of the empty caption (classifier-free guidance).
        checkpoint_every: steps between resumable checkpoints.
    """

    seed: int = field(default=0, metadata={"least": None})
    n_images: int = field(default=24000, metadata={"least": 2})
    steps: int = field(default=3000, metadata={"least": 1})
    batch_size: int = field(default=64, metadata={"least": 1})
    lr: float = 3e-4
    cond_dropout: float = 0.1
    checkpoint_every: int = field(default=250, metadata={"least": 1})

    def __post_init__(self):
        from .train import validate

        validate(self)


def make_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=LAYERS, attention_head_dim=WIDTH // HEADS,
        num_attention_heads=HEADS, joint_attention_dim=2 * M.HIDDEN, caption_projection_dim=WIDTH,
        pooled_projection_dim=2 * M.HIDDEN, pos_embed_max_size=16,
    )


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def text_encoder_from(base_folder: Path, seed: int):
    """tinyworld's text encoder as a ``CLIPTextModelWithProjection`` (its projection seeded: it has none)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection.from_pretrained(str(base_folder / "text_encoder"))


def encode(text_encoders, tokenizer, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """``StableDiffusion3Pipeline.encode_prompt`` without its T5 rows: penultimate hidden states of both CLIP
    encoders concatenated (B, 77, 128) and their pooled projections concatenated (B, 128)."""
    ids = tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden, pooled = [], []
    for enc in text_encoders:
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    return torch.cat(hidden, -1), torch.cat(pooled, -1)


def train(out_dir: str | Path, work_dir: str | Path, config: MMDiTTrainConfig = MMDiTTrainConfig(),
          base: str | Path | None = None) -> dict:
    """Train tinyworld-mmdit (resuming from ``work_dir``) and write the pipeline + judge to ``out_dir``.

    ``base``: the tinyworld UNet model whose VAE, judge, tokenizer and text encoder are reused (default: the
    packaged one)."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    from ..core.mmdit import collapsed_padding
    from . import path as tinyworld_path
    from .judge import TinyworldJudge
    from .train import _AuxHead, _Ema, _check_folders, _cosine, _run_stage, _to_x, make_data

    out_dir, work, base = Path(out_dir), Path(work_dir), Path(base or tinyworld_path())
    _check_folders(out_dir, work)
    if not (base / "model_index.json").is_file():
        raise ConfigError(f"no tinyworld model at {str(base)!r} (its VAE, judge and text encoder are reused)")
    work.mkdir(parents=True, exist_ok=True)
    M.write_json(work / "config.json", asdict(config))
    started = time.time()
    images, labels = make_data(config, work)
    tokenizer = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(base / "vae")).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # StableDiffusion3Pipeline decodes latents / scaling + shift

    torch.manual_seed(config.seed + 3)
    transformer = make_transformer()
    text_encoder = text_encoder_from(base, config.seed + 4).eval().requires_grad_(False)
    text_encoder_2 = text_encoder_from(base, config.seed + 5)
    aux = _AuxHead(2 * M.HIDDEN)
    params = list(transformer.parameters()) + list(text_encoder_2.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    trained = {"transformer": transformer, "text_encoder_2": text_encoder_2}
    ema = _Ema(trained)

    data = _to_x(images)
    with torch.no_grad():
        posts = [vae.encode(data[i:i + 512]).latent_dist for i in tqdm(range(0, len(data), 512), desc="encode")]
    mean = torch.cat([p.mean for p in posts]) * vae.config.scaling_factor
    std = torch.cat([p.std for p in posts]) * vae.config.scaling_factor
    names = {a: list(ATTRIBUTES[a]) for a in ATTRIBUTES}

    def step_fn(step, gen):
        idx = torch.randint(0, len(mean), (config.batch_size,), generator=gen)
        rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
        texts, aux_targets = [], {a: [] for a in ATTRIBUTES}
        for i in idx.tolist():
            words = {a: names[a][labels[i, j]] for j, a in enumerate(ATTRIBUTES)}
            text = caption(Scene(**words), rng) if rng.random() >= config.cond_dropout else ""
            texts.append(text)
            for j, a in enumerate(ATTRIBUTES):
                said = any(s in text for s in ATTRIBUTES[a][words[a]])
                aux_targets[a].append(int(labels[i, j]) if said and text else len(names[a]))
        context, pooled = encode((text_encoder, text_encoder_2), tokenizer, texts)
        context = torch.cat([context, context.new_zeros(len(texts), 1, context.shape[-1])], 1)  # the T5 rows
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(len(z0), generator=gen))  # logit-normal (SD3 §3.1, m = 0, s = 1)
        s = sigma.view(-1, 1, 1, 1)
        pred = transformer((1 - s) * z0 + s * noise, encoder_hidden_states=context, pooled_projections=pooled,
                           timestep=sigma * 1000).sample
        logits = aux(pooled)
        aux_loss = sum(F.cross_entropy(logits[k], torch.tensor(aux_targets[k])) for k in ATTRIBUTES)
        return F.mse_loss(pred, noise - z0) + 0.05 * aux_loss

    def with_ema(step, gen):  # the average takes in the weights of the step before (a resumed run does the same)
        if step:
            ema.update(step - 1)
        return step_fn(step, gen)

    with collapsed_padding(transformer, T5_ROWS):  # the EMA is checkpointed with the weights, atomically
        _run_stage("mmdit", 4, config, work, {**trained, "aux": aux, "ema": ema}, opt, config.steps, with_ema,
                   lambda s: _cosine(s, config.steps))
    ema.copy_to()

    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=make_scheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(), tokenizer_2=copy.deepcopy(tokenizer),
        text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None,
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp)
    TinyworldJudge.from_pretrained(base / "judge").save_pretrained(tmp / "judge")
    manifest = {"arch": "mmdit", "train_config": asdict(config), "generation": dict(GENERATION),
                "train_seconds": round(time.time() - started, 1)}
    M.write_json(tmp / "tinyworld.json", manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return manifest
