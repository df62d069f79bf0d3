"""The erasekit adapter: one ``.safetensors`` file holding an erasure as deltas, plus its record.

Format 1 (spec with a header example: ``adapters/README.md``). Tensors are deltas, never full weights,
keyed by component and diffusers module path::

    unet.<module path>.lora_A.weight          [r, in] (Conv2d: [r, in, kh, kw])   "down"  (SD3/FLUX: transformer.…)
    unet.<module path>.lora_B.weight          [out, r] (Conv2d: [out, r, 1, 1])   "up"
    text_encoder.<module path>.delta          [out, in] (Conv2d: [out, in, kh, kw]), only where no low rank exists
    unet.<module path>.delta_values/_indices/_shape   a sparse full delta (format 1.2): nonzero values, flat indices
    stats.<name>                              optional closed-form statistics for exact merging
    gate.<name>                               optional gating data (e.g. SPM's erased-prompt embeddings)
    guard.<name>                              an inference-time guard's data (format 1.1, e.g. SAFREE's subspace)

so that ``W_eff = W + weight · gate(prompt) · (lora_B @ lora_A)`` (or ``+ delta``). The record is one JSON
object under the ``erasekit.adapter`` metadata key (safetensors metadata values are strings). An adapter of kind
``"guard"`` (format 1.1) holds no deltas: its record's ``guard`` names a rule that filters the UNet's text
context at generation time (:mod:`erasekit.compose.guards`).

In memory, ``stats.<name>`` is ``Adapter.stats["<name>"]``, ``gate.<name>`` is ``Adapter.stats["gate.<name>"]`` and
``guard.<name>`` is ``Adapter.stats["guard.<name>"]``.

The package: :mod:`.model` (:class:`Adapter`, :func:`describe`, the format's names), :mod:`.writer`
(:func:`save_adapter`: atomic write), :mod:`.reader` (:func:`load_adapter`: validates everything, never
unpickles; :func:`read_record`: the header only), :mod:`.fingerprint` (:func:`fingerprint` of a pipeline's
weights, :func:`check_compatible`: does an adapter fit a pipeline?, :func:`resolve_module`, :func:`find_module`,
:func:`denoiser_component`: ``"unet"`` or ``"transformer"``)
and :mod:`.spec` (the tensor rules writer and reader share). ``ModuleDelta`` lives in :mod:`erasekit.core.lora`.
"""

from ..core.lora import ModuleDelta
from .fingerprint import (FINGERPRINT_BLOCKS, FINGERPRINT_SAMPLE, check_compatible, denoiser_component, find_module,
                          fingerprint, resolve_module)
from .model import (COMPONENTS, DENOISERS, FORMAT_KEY, FORMAT_VERSION, GATING_RULES, GUARD_RULES, KINDS,
                    METADATA_KEY, Adapter, describe)
from .reader import load_adapter, read_record
from .writer import save_adapter, write_safetensors

__all__ = [
    "Adapter", "ModuleDelta", "describe", "save_adapter", "write_safetensors", "load_adapter", "read_record",
    "fingerprint", "check_compatible", "resolve_module", "find_module", "denoiser_component", "COMPONENTS",
    "DENOISERS", "GATING_RULES", "GUARD_RULES", "KINDS",
    "FORMAT_VERSION", "FORMAT_KEY", "METADATA_KEY", "FINGERPRINT_SAMPLE", "FINGERPRINT_BLOCKS",
]
