"""Batched, seeded generation: each (prompt, seed) image is reproducible on its own, whatever the batch."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .core import sd
from .core.device import generators
from .errors import ConfigError


def generate(pipe, prompts: list[str], seeds: list[int], *, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, negative_prompt: str | None = None, batch_size: int = 64,
             output_type: str = "pil", progress: bool = False, **kwargs):
    """Generate one image per (prompt, seed) pair; ``prompts`` and ``seeds`` have equal length.

    Returns a list of PIL images (or an (N, H, W, 3) float array with ``output_type="np"``). On SD3 without T5 the
    transformer runs on one of the 256 identical T5 rows standing for all (:func:`erasekit.core.mmdit.
    collapsed_generation`): the stock pipeline's images to float rounding, about three times faster.

    Raises:
        ConfigError: unequal prompts and seeds, fewer than 1 step, a non-finite guidance scale, a batch size < 1.
    """
    if len(prompts) != len(seeds):
        raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    steps, guidance = sd.generation_settings(pipe, num_inference_steps, guidance_scale)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    device = pipe._execution_device
    if sd.is_mmdit(pipe):  # SD3 without T5: one zero row stands exactly for its 256 (erasekit.core.mmdit)
        from .core.mmdit import collapsed_generation

        with collapsed_generation(sd.denoiser(pipe)):
            return _generate(pipe, prompts, seeds, steps, guidance, negative_prompt, batch_size, output_type,
                             progress, device, kwargs)
    return _generate(pipe, prompts, seeds, steps, guidance, negative_prompt, batch_size, output_type, progress,
                     device, kwargs)


def _generate(pipe, prompts, seeds, steps, guidance, negative_prompt, batch_size, output_type, progress, device,
              kwargs):
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        chunk = prompts[i:i + batch_size]
        negative = None if negative_prompt is None else [negative_prompt] * len(chunk)
        with torch.no_grad():
            result = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative,
                          generator=generators(seeds[i:i + batch_size], device), output_type=output_type, **kwargs)
        out.extend(result.images if output_type == "pil" else [result.images])
    if output_type != "pil":
        import numpy as np

        return np.concatenate(out)
    return out


def contact_sheet(images, columns: int = 8, labels: list[str] | None = None):
    """Tile PIL images into one PIL image (labels are not drawn; they go in the caller's output)."""
    from PIL import Image

    columns = max(1, min(columns, len(images)))
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for k, im in enumerate(images):
        sheet.paste(im, ((k % columns) * w, (k // columns) * h))
    return sheet
