"""What the text-encoder methods (AdvUnlearn, few-shot erasing) share: trainable deltas on the pipeline's text
encoder(s), differentiable prompt encoding, a partial DDIM rollout with the frozen model, packaging.

The UNet and VAE stay frozen; deltas are attached with ``erasekit.core.lora`` hooks to the ``nn.Linear`` modules of
``pipe.text_encoder`` (and ``pipe.text_encoder_2`` on SDXL), so that ``deltas.disabled()`` is the original model,
bit for bit, and the adapter holds ``text_encoder.<module path>`` deltas only. Module paths are stored without
the ``text_model.`` prefix (transformers ≥ 5 spelling; ``erasekit.compose`` resolves both). Only ``nn.Linear``
weights are adapted: the adapter format has no LayerNorm deltas, so the authors' ``final_layer_norm`` option and
the layers' own LayerNorms stay frozen.

The adapter's fingerprint covers the text encoder(s) only: it loads onto any pipeline sharing the encoder,
whatever its UNet (the "plug-and-play" transfer the AdvUnlearn paper claims).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator

import torch

from ..adapter import Adapter, ModuleDelta
from ..core import lora, sd
from ..errors import ConfigError
from . import trainer

ENCODERS = ("text_encoder", "text_encoder_2")
_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def encoder_components(pipe) -> list[str]:
    """The pipeline's text encoders, in ``encode_prompt`` order (SD: one; SDXL: two)."""
    return [c for c in ENCODERS if isinstance(getattr(pipe, c, None), torch.nn.Module)]


def layer_index(name: str) -> int | None:
    """The transformer layer a module path lies in ("encoder.layers.3.mlp.fc1" → 3), or None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def num_layers(encoder: torch.nn.Module) -> int:
    return int(encoder.config.num_hidden_layers)


def select(pipe, include: Callable[[str, int, int], bool]) -> dict[str, list[str]]:
    """Per text encoder, the ``nn.Linear`` paths inside its transformer layers for which
    ``include(path, layer, num_layers)``; ConfigError when nothing is selected."""
    out = {}
    for component in encoder_components(pipe):
        encoder = getattr(pipe, component)
        total = num_layers(encoder)
        names = [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)
                 and (layer := layer_index(n)) is not None and include(n, layer, total)]
        if names:
            out[component] = names
    if not out:
        raise ConfigError("the module selection matches no Linear layer of the text encoder")
    return out


def canonical(path: str) -> str:
    return path.removeprefix("text_model.")


class EncoderDeltas:
    """``lora.Deltas`` on each selected text encoder, seen as one set (params, ``disabled``, ``export``)."""

    def __init__(self, pipe, names: dict[str, list[str]], rank: int, generator: torch.Generator):
        self.parts = {c: lora.Deltas(getattr(pipe, c), n, rank, generator) for c, n in names.items()}

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        return {f"{c}.{k}": p for c, d in self.parts.items() for k, p in d.params.items()}

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The original text encoder(s)."""
        with contextlib.ExitStack() as stack:
            for d in self.parts.values():
                stack.enter_context(d.disabled())
            yield

    def ratios(self) -> dict[str, float]:
        """``‖ΔW‖/‖W‖`` of each module (see ``lora.Deltas.ratios``), keyed ``<component>.<path>``."""
        return {f"{c}.{k}": v for c, d in self.parts.items() for k, v in d.ratios().items()}

    def export(self) -> dict[str, ModuleDelta]:
        out = {}
        for c, d in self.parts.items():
            for key, delta in d.export(c).items():
                out[f"{c}.{canonical(key[len(c) + 1:])}"] = delta
        return out


@contextlib.contextmanager
def attached(pipe, names: dict[str, list[str]], rank: int, seed: int) -> Iterator[EncoderDeltas]:
    """Trainable deltas on the text encoder(s) for the block; every component frozen and in eval mode meanwhile
    (CLIP and the UNet have no dropout to speak of; eval keeps student and teacher identical). Hooks, grad flags
    and train/eval modes are restored on exit."""
    components = [m for m in (getattr(pipe, c, None) for c in ("unet", "transformer", "vae", *ENCODERS)) if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in components]
    deltas = EncoderDeltas(pipe, names, rank, torch.Generator().manual_seed(seed))
    with contextlib.ExitStack() as stack:
        for m in components:
            stack.enter_context(lora.frozen(m))
            m.eval()
        try:
            for d in deltas.parts.values():
                d.attach()
            yield deltas
        finally:
            for d in deltas.parts.values():
                d.remove()
            for m, mode in zip(components, modes):
                m.train(mode)


# ------------------------------------------------------------------------------------------ conditioning
def encode(pipe, prompts: list[str]) -> sd.Cond:
    """The UNet conditioning of ``prompts`` through the pipeline's current (hooked, trainable) encoders, with grad;
    the same tensors as ``pipe.encode_prompt`` (SD: last hidden state; SDXL: both penultimate states + pooled)."""
    return sd.encode_ids(pipe, sd.prompt_ids(pipe, prompts))


@torch.no_grad()
def rollout(pipe, scheduler, cond: sd.Cond, uncond: sd.Cond, guidance: float, steps: int, shape: tuple,
            generator: torch.Generator, keep: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t after ``steps`` DDIM steps with CFG from pure noise, and t = the next timestep
    (:func:`erasekit.methods.trainer.guided_steps`, the text-encoder conditioning of :mod:`erasekit.core.sd`).

    The noise of the whole batch ``shape`` is drawn; only its rows ``keep`` (a process's part) are rolled out.
    ``cond`` has one row per kept sample or one row for all; ``uncond`` one row.
    """
    x = (torch.randn(shape, generator=generator)[keep] * getattr(scheduler, "init_noise_sigma", 1.0)).to(
        sd.device_of(pipe))
    n = x.shape[0]
    cond = cond if cond.embeds.shape[0] == n else cond.expand(n)
    both = sd.Cond.cat([uncond.expand(n), cond])
    return trainer.guided_steps(lambda x2, t: sd.unet_eps(pipe, x2, t, both), scheduler, x, guidance, steps)


# ------------------------------------------------------------------------------------------ training
def train(pipe, config, names: dict[str, list[str]], loss_for: Callable, method: str, steps: int, *,
          extra_params: dict[str, torch.Tensor] | None = None) -> Adapter:
    """Attach deltas on ``names``, fit ``loss_for(deltas)`` with the shared loop, package a text-encoder Adapter.

    ``extra_params``: further tensors to checkpoint with the run (e.g. AdvUnlearn's attack state); they get no
    gradient from the loss, so Adam leaves them alone.
    """
    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with attached(pipe, names, config.rank, config.seed) as deltas:
        loss_fn = loss_for(deltas)
        params = {**deltas.params, **(extra_params or {})}
        losses = trainer.fit(params, loss_fn, steps=steps, lr=config.lr, seed=config.seed,
                             checkpoint_dir=config.checkpoint_dir or None, checkpoint_every=config.checkpoint_every,
                             resume=config.resume, run=trainer.run_settings(config),
                             mixed_precision=config.mixed_precision, progress=config.progress, desc=method,
                             ratios=deltas.ratios, saliency=config.saliency,
                             saliency_batches=config.saliency_batches, gradient_surgery=config.gradient_surgery)
        module_deltas = deltas.export()
    training = {"steps": len(losses), "seconds": round(time.perf_counter() - started, 2),
                "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    if torch.cuda.is_available():
        training["peak_cuda_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    components = sorted({k.partition(".")[0] for k in module_deltas}, key=ENCODERS.index)
    return trainer.package(pipe, config, method, module_deltas, components, trainer.training_info(training))
