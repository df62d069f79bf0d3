"""TIME — Text-to-Image Model Editing (Orgad, Kawar, Belinkov, ICCV 2023, https://arxiv.org/abs/2303.08084).

The closed form of the paper's Eq. 4, ``W' = (λW + Σ_i v*_i k_iᵀ)(λI + Σ_i k_i k_iᵀ)⁻¹``, is the UCE solve
(:mod:`erasekit.methods.uce`) with erase scale 1 and no preserve term, so it shares that module's text-space
factorisation, exact low-rank deltas and mergeable statistics. What makes it TIME (``apply_time.py``,
``train_funcs.py`` of bahjat-kawar/time-diffusion):

* keys: all 77 context vectors of the source prompt (the concept); targets ``v*_i = W c_dst[a(i)]``, where ``a``
  aligns each source token to the same token of the destination prompt (the guide) and the padding
  positionally (:func:`erasekit.methods.text.align_tokens`);
* modules: ``attn2.to_v`` only, ``attn2.to_k`` too with ``with_to_k`` (the paper's runs use it);
* λ = 0.1 (the repo default); ``with_augs`` adds "A photo of / An image of / A picture of" variants of source
  and destination.
"""

import logging
import time
from dataclasses import dataclass

import torch

from ..adapter import Adapter
from . import text, uce

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimeConfig:
    """TIME as a preset of the UCE solve (repo defaults).

    Args:
        concepts: source prompts whose cross-attention keys/values are edited, e.g. ("a pack of roses",).
        guides: destination prompts, one for all or one per concept, e.g. ("a pack of blue roses",);
            "" maps the concept towards the unconditional prompt (erasure).
        lam: λ, keeps W close to the original (repo default 0.1).
        with_to_k: edit attn2.to_k as well as attn2.to_v.
        with_augs: add "A photo of / An image of / A picture of" variants of each source/destination pair.
        save_stats: store the keys of the solve so TIME/UCE adapters with the same λ and modules merge exactly.
    """

    concepts: tuple[str, ...]
    guides: tuple[str, ...] = ("",)
    lam: float = 0.1
    with_to_k: bool = False
    with_augs: bool = False
    save_stats: bool = True

    def __post_init__(self):
        uce.validate_config(self)
        uce.positive(self, "lam")
        uce.single_guides(self)

    @property
    def targets(self) -> tuple[str, ...]:
        return ("attn2.to_k", "attn2.to_v") if self.with_to_k else ("attn2.to_v",)


def collect_keys(pipe, config: TimeConfig, batch_size: int = 256) -> uce.Keys:
    """77 aligned (source, destination) key pairs per prompt pair; no preserve keys."""
    pairs = []
    for source, destination in uce.prompt_pairs(config.concepts, config.guides):
        if config.with_augs:
            pairs += list(zip(text.time_augment(source), text.time_augment(destination)))
        else:
            pairs.append((source, destination))
    unique = list(dict.fromkeys([p for pair in pairs for p in pair]))
    row = {p: i for i, p in enumerate(unique)}
    emb = text.encode_prompts(pipe, unique, batch_size)  # (U, 77, d)
    erase = torch.cat([emb[row[s]] for s, _ in pairs])
    guide = torch.cat([emb[row[d]][text.align_tokens(pipe, s, d)] for s, d in pairs])
    return uce.Keys(erase, guide, emb.new_zeros(0, emb.shape[-1]))


@torch.no_grad()
def erase(pipe, config: TimeConfig) -> Adapter:
    """Return the TIME edit of ``pipe``'s UNet as exact low-rank deltas; ``pipe`` is not modified."""
    start = time.perf_counter()
    modules = uce.find_targets(pipe, config.targets)
    keys = collect_keys(pipe, config)
    edit = uce.solve(keys, erase_scale=1.0, preserve_scale=0.0, lam=config.lam)
    deltas = uce.module_deltas(modules, edit.P, edit.Q)
    info = {"rank": int(edit.P.shape[1]), "erase_keys": int(keys.erase.shape[0]), "preserve_keys": 0,
            "targets": list(config.targets), "seconds": round(time.perf_counter() - start, 3)}
    logger.info("time: %d concept(s), %d keys, rank %d, %d modules", len(config.concepts), info["erase_keys"],
                info["rank"], len(deltas))
    stats = uce.key_stats(keys, 1.0, 0.0) if config.save_stats else {}
    return uce.make_adapter("time", config, pipe, deltas, stats, info)
