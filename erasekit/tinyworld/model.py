"""Component factories for tinyworld: the exact Stable Diffusion architecture at toy size.

``AutoencoderKL`` (32×32×3 ↔ 8×8×4 latents), a ``CLIPTextModel`` with a generated ``CLIPTokenizer``,
a ``UNet2DConditionModel`` with cross-attention, and SD 1.x's noise schedule in a ``DDIMScheduler``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tokenizer import write_tokenizer_files

HIDDEN = 64  # text hidden size = UNet cross_attention_dim (SD 1.x: 768)


def make_tokenizer(directory: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tokenizer_files(directory)))


def make_text_encoder(vocab_size: int, bos_token_id: int, eos_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, pad_token_id=eos_token_id, projection_dim=HIDDEN, hidden_act="quick_gelu",
    ))


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), norm_num_groups=8,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=32,
    )


def make_scheduler():
    """SD 1.x's training schedule (scaled-linear betas 0.00085 → 0.012, ε-prediction) for DDIM sampling."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def make_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
