"""Pipelines built in code with random weights, for tests and benchmarks (no hub, no download).

``tiny_pipeline("sd1" | "sd2" | "sdxl")`` has the *structure* of each family at toy width:
SD 1.x (conv ``proj_in``, one CLIP encoder), SD 2.x (linear projections, head dims per block),
SDXL (two text encoders, the second with projection, ``text_time`` added conditioning, concatenated
2-encoder context), SD3 (an ``SD3Transformer2DModel``: joint attention, two CLIP encoders with projection, no T5,
flow matching). ``sd15_unet()`` / ``sd15_text_encoder()`` have SD 1.5's full shapes, ``sdxl_unet()`` /
``sdxl_text_encoders()`` SDXL base's, ``sd3_medium_transformer()`` / ``sd3_text_encoders()`` SD3-medium's, and
``real_shape_pipeline("sd15" | "sdxl" | "sd3")`` puts them in a pipeline.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .tinyworld.tokenizer import write_tokenizer_files

FAMILIES = ("sd1", "sd2", "sdxl")  # UNet families
MMDIT_FAMILIES = ("sd3",)  # transformer (MMDiT) families

#: a budget of one or two steps per registered attack, for the tiny random pipelines (``tiny_pipeline``) whose
#: prompts speak of cats, dogs and cars; the attacks' own presets are for real models and tinyworld
TINY_ATTACKS = {
    "unlearndiffatk": dict(n_timesteps=1, iterations=2),
    "p4d": dict(iterations=2, eval_every=2),
    "ring_a_bell": dict(length=3, population=6, generations=2, with_prompts=("a red cat",), without_prompts=("a red",)),
    "cce": dict(steps=1, batch_size=2, gradient_accumulation=1, num_train_images=2),
    "concept_arithmetic": dict(synonyms=("dog",), subtract=("car",), scales=(1.0,)),
    "paraphrase": dict(synonyms=("dog", "car"), max_variants=2),
    "sage": dict(iterations=2, eval_every=2, gradient_checkpointing=False),
}


def tiny_tokenizer(directory: str | Path | None = None):
    from transformers import CLIPTokenizer

    if directory is None:  # the files are read once: nothing is left behind
        with tempfile.TemporaryDirectory(prefix="erasekit-tok-") as scratch:
            return tiny_tokenizer(scratch)
    return CLIPTokenizer.from_pretrained(str(write_tokenizer_files(Path(directory), extra_words=("cat", "dog", "car"))))


def _clip_config(tokenizer, hidden: int, layers: int = 2, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection or hidden, hidden_act="gelu",
    )


def tiny_components(family: str = "sd1", seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES + MMDIT_FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES + MMDIT_FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    common = dict(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8)
    if family == "sd1":
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            **common)
        text_encoder = CLIPTextModel(_clip_config(tokenizer, 24))
        return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                    safety_checker=None, feature_extractor=None, image_encoder=None)
    if family == "sd2":
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4),
            use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            **common)
        text_encoder = CLIPTextModel(_clip_config(tokenizer, 32))
        return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                    safety_checker=None, feature_extractor=None, image_encoder=None)
    if family == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        vae.register_to_config(shift_factor=0.0)
        # context = concat(encoder 1 hidden 16, encoder 2 hidden 16) = 32 = joint_attention_dim; pooled 16 + 16
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16)
        return dict(transformer=transformer, vae=vae,
                    text_encoder=CLIPTextModelWithProjection(_clip_config(tokenizer, 16, projection=16)),
                    text_encoder_2=CLIPTextModelWithProjection(_clip_config(tokenizer, 16, projection=16)),
                    tokenizer=tokenizer, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), image_encoder=None, feature_extractor=None)
    # sdxl: context = concat(encoder 1 hidden 16, encoder 2 hidden 24) = 40; pooled from encoder 2
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=40, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 24,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **common)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, 24, projection=24))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, scheduler=scheduler, image_encoder=None, feature_extractor=None)


def tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A ``StableDiffusionPipeline`` (sd1, sd2), ``StableDiffusionXLPipeline`` (sdxl) or
    ``StableDiffusion3Pipeline`` (sd3) with random weights."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    components = tiny_components(family, seed)
    if family == "sd3":
        pipe = StableDiffusion3Pipeline(**components)
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline(**components)
    else:
        pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0):
    """A ``FluxPipeline`` with random weights at toy width: a ``FluxTransformer2DModel`` (one double-stream and one
    single-stream block, 2×2-packed latents of the tiny VAE), a CLIP encoder (pooled) and a one-layer T5 encoder
    (context) sharing the tiny CLIP tokenizer. Generate with ``height=width=16, max_sequence_length=77``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    parts = tiny_components("sd1", seed)
    tokenizer, vae = parts["tokenizer"], parts["vae"]
    vae.register_to_config(shift_factor=0.0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                 dropout_rate=0.0)).eval()  # built in code, a model is in training mode
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=CLIPTextModel(_clip_config(tokenizer, 16)), tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cast(model, dtype: torch.dtype):
    """``model`` in ``dtype`` (left alone in fp32: diffusers warns about any ``.to(dtype)`` of a model)."""
    return model if dtype == torch.float32 else model.to(dtype=dtype)


def sd15_unet(dtype: torch.dtype = torch.float32):
    """A UNet with Stable Diffusion 1.5's exact configuration and random weights (≈ 860 M parameters)."""
    from diffusers import UNet2DConditionModel

    return _cast(UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ), dtype)


def sdxl_unet(dtype: torch.dtype = torch.float32):
    """A UNet with Stable Diffusion XL base 1.0's configuration and random weights (≈ 2.6 B parameters)."""
    from diffusers import UNet2DConditionModel

    return _cast(UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ), dtype)


def sdxl_text_encoders(tokenizer=None, dtype: torch.dtype = torch.float32):
    """SDXL's two text encoders with random weights: CLIP ViT-L (768 wide) and OpenCLIP ViT-bigG (1280 wide,
    32 layers, with projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tokenizer or tiny_tokenizer()
    common = dict(vocab_size=max(len(tokenizer), 49408), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    one = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **common))
    two = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                     **common))
    return one.to(dtype), two.to(dtype)


#: Stable Diffusion 3 medium's transformer configuration (``stabilityai/stable-diffusion-3-medium-diffusers``,
#: ``transformer/config.json``): 24 joint blocks 1536 wide (24 heads × 64), context 4096 wide (CLIP-L 768 + CLIP-G
#: 1280, zero-padded to T5's 4096), pooled text 2048 (768 + 1280), 16 latent channels in 2×2 patches
SD3_MEDIUM_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)


def sd3_medium_transformer(dtype: torch.dtype = torch.float32):
    """An ``SD3Transformer2DModel`` with Stable Diffusion 3 medium's configuration (:data:`SD3_MEDIUM_CONFIG`) and
    random weights (≈ 2.03 B parameters, 8.1 GB in fp32). Build it under ``torch.device("meta")`` and
    ``to_empty`` it where only shapes matter (as the perf benchmarks do): the full random init takes a while on a CPU."""
    from diffusers import SD3Transformer2DModel

    return _cast(SD3Transformer2DModel(**SD3_MEDIUM_CONFIG), dtype)


def sd3_text_encoders(tokenizer=None, dtype: torch.dtype = torch.float32):
    """SD3's two CLIP text encoders with random weights, both with projection (SD3 reads both pooled outputs):
    CLIP ViT-L (768 wide, 12 layers) and OpenCLIP ViT-bigG (1280 wide, 32 layers). SD3's third encoder (T5-XXL) is
    optional and left out (``text_encoder_3=None``)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = tokenizer or tiny_tokenizer()
    common = dict(vocab_size=max(len(tokenizer), 49408), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    one = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                     num_attention_heads=12, hidden_act="quick_gelu",
                                                     projection_dim=768, **common))
    two = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                     **common))
    return one.eval().to(dtype), two.eval().to(dtype)


def sd3_small_vae():
    """A tiny ``AutoencoderKL`` with SD3's latent interface: 16 latent channels, 8× downsampling (four blocks), SD3's
    scaling and shift factors; so that an SD3-shaped pipeline's sizes are SD3's (1024 px ↔ 128×128 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=4, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609)


def real_shape_pipeline(family: str = "sd15", dtype: torch.dtype = torch.float32, unet=None, transformer=None):
    """A pipeline with a real model's denoiser and text encoder(s) (random weights) and a tiny VAE: ``"sd15"``,
    ``"sdxl"`` or ``"sd3"`` (SD3-medium's transformer and CLIP encoders, no T5; a VAE with SD3's 16 latent channels).
    For timing and memory, which do not depend on the weights. ``unet`` / ``transformer``: one built by the caller."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sd3":
        parts = tiny_components("sd3")
        parts["transformer"] = transformer if transformer is not None else sd3_medium_transformer(dtype)
        parts["text_encoder"], parts["text_encoder_2"] = sd3_text_encoders(parts["tokenizer"], dtype)
        parts["vae"] = sd3_small_vae()
        pipe = StableDiffusion3Pipeline(**parts)
    elif family == "sd15":
        parts = tiny_components("sd1")
        parts["unet"] = unet if unet is not None else sd15_unet(dtype)
        parts["text_encoder"] = sd15_text_encoder(parts["tokenizer"], dtype)
        pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    elif family == "sdxl":
        parts = tiny_components("sdxl")
        parts["unet"] = unet if unet is not None else sdxl_unet(dtype)
        parts["text_encoder"], parts["text_encoder_2"] = sdxl_text_encoders(parts["tokenizer"], dtype)
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        raise ValueError(f"family must be 'sd15', 'sdxl' or 'sd3', got {family!r}")
    if dtype != torch.float32:
        pipe.vae.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs(unet, batch: int, device, dtype, generator=None) -> dict:
    """Random inputs of one UNet call at the model's native resolution: sample, timestep, context (and SDXL's
    ``added_cond_kwargs``)."""
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    gen = generator or torch.Generator().manual_seed(0)
    out = {"sample": torch.randn(batch, 4, size, size, generator=gen).to(device, dtype),
           "timestep": torch.tensor([500] * batch, device=device),
           "encoder_hidden_states": torch.randn(batch, 77, width, generator=gen).to(device, dtype)}
    if unet.config.addition_embed_type == "text_time":
        out["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=gen).to(device, dtype),
                                    "time_ids": torch.tensor([[8 * size, 8 * size, 0, 0, 8 * size, 8 * size]] * batch,
                                                             device=device, dtype=dtype)}
    return out


def sd3_inputs(transformer, batch: int, device, dtype, size: int | None = None, context_rows: int = 77 + 256,
               generator=None) -> dict:
    """Random inputs of one SD3 transformer call: latents (B, C, size, size) (``size``: latent side, default the
    model's ``sample_size``), timestep, context (B, ``context_rows``, joint_attention_dim) (SD3's pipeline without
    T5: 77 CLIP rows and 256 zero rows) and pooled projections."""
    config = transformer.config
    size = size or config.sample_size
    gen = generator or torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=gen).to(device, dtype),
            "timestep": torch.full((batch,), 500.0, device=device),
            "encoder_hidden_states": torch.randn(batch, context_rows, config.joint_attention_dim,
                                                 generator=gen).to(device, dtype),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=gen).to(device, dtype)}


def sd15_text_encoder(tokenizer=None, dtype: torch.dtype = torch.float32):
    """A CLIP ViT-L/14 text encoder (SD 1.x's: 12 layers, 768 wide) with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tokenizer or tiny_tokenizer()
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=max(len(tokenizer), 49408), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu",
        projection_dim=768)).to(dtype)


def cpu_launch(processes: int = 2) -> tuple[list[str], dict]:
    """The command prefix and environment that start ``processes`` CPU processes on this machine with accelerate's
    launcher (they talk over gloo), for tests of erasekit's multi-process paths: ``subprocess.run([*prefix,
    "script.py"], env=env)`` or ``[*prefix, "-m", "erasekit.cli", "bench", ...]``
    (:func:`erasekit.core.processes.local_launch`, one thread per process: tests run beside each other)."""
    from .core.processes import local_launch

    prefix, env = local_launch(processes, cpu=True)
    return prefix, {**env, "OMP_NUM_THREADS": "1"}


def sd15_shapes_pipeline(unet):
    """An SD 1.x pipeline around ``unet`` (e.g. :func:`sd15_unet`) with a one-layer text encoder of SD 1.5's width
    (768) and the tiny VAE: SD 1.5's cross-attention shapes at a test's cost."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    components = tiny_components("sd1")
    tok = components["tokenizer"]
    components.update(unet=unet, text_encoder=CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=768, intermediate_size=768, num_hidden_layers=1, num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)))
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def judged_circle_shapes(pipe, judge, adapter) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """What tinyworld's judge calls the shape of seed-0 images made with ``adapter`` loaded (unloaded after): 8 of the
    grid's 24 circle scenes under each of circle's names ({name: labels}), and every 10th scene of another shape
    ([(label, the scene's shape)]). The judged tests of single-concept erasures share it."""
    from . import compose
    from .generate import generate
    from .tinyworld.eval import standard_grid

    names = ("circle", "disc", "round shape")
    circles = [s for s in standard_grid() if s.shape == "circle"][::3]
    others = [s for s in standard_grid() if s.shape != "circle"][::10]
    prompts = [s.prompt(names={"shape": w}) for w in names for s in circles] + [s.prompt() for s in others]
    name = compose.load(pipe, adapter)
    try:
        images = generate(pipe, prompts, [0] * len(prompts), output_type="np")
    finally:
        compose.unload(pipe, name)
    shapes = judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).labels("shape")
    n = len(circles)
    named = {w: shapes[i * n:(i + 1) * n] for i, w in enumerate(names)}
    return named, list(zip(shapes[len(names) * n:], [s.shape for s in others]))
