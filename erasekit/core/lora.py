"""ΔW on ``nn.Linear``/``nn.Conv2d`` modules: :class:`ModuleDelta` (a stored delta), the one forward-hook applier
(:func:`project_down`, :func:`project_up`, :func:`add_low_rank`, shared with ``erasekit.compose``), and trainable
deltas attached with forward hooks.

Each adapted module computes ``m(x) + ΔW x`` where ``ΔW = up @ down`` is low rank (LoRA, Hu et al. 2021,
https://arxiv.org/abs/2106.09685, Eq. 3: ``h = W₀x + BAx``, ``B`` = up initialised to zero) or a full matrix
(``rank=0``). The base weights and the module classes are never touched: the hooks only add a term to the
module's output, so ``with deltas.disabled():`` turns the very same model back into the frozen original, bit
for bit. Trained methods use this to let one UNet serve as both student and teacher.

>>> with attach(unet, select(unet, lambda name, m: ".attn2." in name), rank=4) as deltas:
...     student = unet(x, t, c).sample
...     with deltas.disabled():
...         teacher = unet(x, t, c).sample
...     module_deltas = deltas.export("unet")   # {"unet.<path>": ModuleDelta}
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

SUPPORTED = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class ModuleDelta:
    """The change to one ``nn.Linear``/``nn.Conv2d`` weight: low-rank ``up @ down`` or a full ``delta``."""

    down: torch.Tensor | None = None  # lora_A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor | None = None  # lora_B: [out, r] or [out, r, 1, 1]
    delta: torch.Tensor | None = None  # [out, in] or [out, in, kh, kw]

    def __post_init__(self):
        low_rank = self.down is not None and self.up is not None
        if low_rank == (self.delta is not None) or (self.down is None) != (self.up is None):
            raise ValueError("a ModuleDelta is either (down, up) or delta")

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the module weight this delta applies to."""
        if self.delta is not None:
            return tuple(self.delta.shape)
        return (self.up.shape[0],) + tuple(self.down.shape[1:])

    def dense(self) -> torch.Tensor:
        """The full ΔW (fp32)."""
        if self.delta is not None:
            return self.delta.float()
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (up @ down).reshape(self.weight_shape)


def select(model: nn.Module, include: Callable[[str, nn.Module], bool]) -> list[str]:
    """Names of the ``nn.Linear``/``nn.Conv2d`` modules of ``model`` for which ``include(name, module)``."""
    return [name for name, m in model.named_modules() if isinstance(m, SUPPORTED) and include(name, m)]


def _kaiming_(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # nn.Linear's default init (kaiming_uniform with a=√5, i.e. U(±1/√fan_in)), drawn from a seeded generator
    bound = 1 / math.sqrt(tensor[0].numel())
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


# ---------------------------------------------------------------------------------------------- the ΔW applier
# One implementation of ``ΔW x`` for the hooks of training (``Deltas``) and of generation (``erasekit.compose``).

def project_down(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``A x``: Linear ``x @ Aᵀ``; Conv2d: a convolution with ``A`` as kernel and the module's stride, padding and
    dilation. A full ``ΔW`` is applied the same way (the module itself, without bias)."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation)
    return F.linear(x, weight)


def project_up(module: nn.Module, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``B h``: Linear ``h @ Bᵀ``; Conv2d: a 1×1 convolution with ``B``."""
    return F.conv2d(h, weight) if isinstance(module, nn.Conv2d) else F.linear(h, weight)


def add_low_rank(module: nn.Module, x: torch.Tensor, output: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                 coefs: list | None = None, ranks: list[int] | None = None) -> torch.Tensor:
    """``output + Σ_i B_i (c_i A_i x)`` for stacked factors ``down = [A_1; …; A_n]``, ``up = [B_1 … B_n]``.

    One down-projection, per-column coefficients ``c_i`` (floats, or per-sample ``(B, 1, …)`` tensors; ``ranks``
    gives each term's columns), and the up-projection accumulated into ``output`` in place when no gradient is
    recorded (one pass over the full-size output, however many terms).
    """
    h = project_down(module, x, down)
    if coefs is not None and not all(isinstance(c, float) and c == 1.0 for c in coefs):
        h = h * column_scale(coefs, ranks, h, 1 if isinstance(module, nn.Conv2d) else h.ndim - 1)
    recording = torch.is_grad_enabled() and (output.requires_grad or h.requires_grad)
    if recording or not output.is_contiguous() or up.shape[2:] not in ((), (1, 1)):
        return output + project_up(module, h, up)
    if isinstance(module, nn.Conv2d):
        b, c, r = output.shape[0], output.shape[1], up.shape[1]
        output.view(b, c, -1).baddbmm_(up.view(c, r).expand(b, c, r), h.reshape(b, r, -1))
    else:
        output.view(-1, output.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t())
    return output


def add_low_rank_per_sample(module: nn.Module, x: torch.Tensor, output: torch.Tensor, down: torch.Tensor,
                            up: torch.Tensor) -> torch.Tensor:
    """``output_b + U_b (A x_b)`` for each sample ``b``, in place: ``down`` = the stacked ``A`` ``(R, in[, kh, kw])``;
    ``up`` = per-sample up-projections with the coefficients folded in, ``(B, R, out)`` for a Linear on
    ``(B, N, in)``, ``(B, out, R)`` for a Conv2d. For inference (nothing recorded for autograd), ``output``
    contiguous: two kernels whatever the number of terms and gates."""
    h = project_down(module, x, down)
    if isinstance(module, nn.Conv2d):  # (B, C, HW) += (B, C, R) @ (B, R, HW)
        b, c = output.shape[:2]
        output.view(b, c, -1).baddbmm_(up, h.reshape(b, up.shape[2], -1))
    else:  # (B, N, out) += (B, N, R) @ (B, R, out)
        output.baddbmm_(h, up)
    return output


def column_scale(coefs: list, ranks: list[int], h: torch.Tensor, channel: int) -> torch.Tensor:
    """Per-sample, per-rank-column factors ``c_i`` (floats, or ``(B, 1, …)`` gate tensors), shaped to multiply ``h``."""
    batch = h.shape[0]
    columns = [h.new_full((batch, r), c) if isinstance(c, float) else c.reshape(-1, 1).expand(batch, r)
               for c, r in zip(coefs, ranks)]
    scale = torch.cat(columns, 1)
    shape = [batch] + [1] * (h.ndim - 1)
    shape[channel] = scale.shape[1]
    return scale.view(shape) if channel == h.ndim - 1 else scale.view(batch, -1, *([1] * (h.ndim - 2)))


class Deltas:
    """Trainable ``ΔW`` on named modules of a model (see the module docstring).

    Args:
        model: the model to adapt (e.g. ``pipe.unet``); it is not modified until ``attach``.
        names: module paths inside ``model`` (``nn.Linear`` or ``nn.Conv2d`` with ``groups=1``).
        rank: ``r`` of ``up @ down``; 0 trains a full ``ΔW``.
        generator: seeds ``down`` (``up`` and full deltas start at zero, so ΔW = 0 at first).
    """

    def __init__(self, model: nn.Module, names: list[str], rank: int, generator: torch.Generator | None = None):
        if not names:
            raise ConfigError("no module selected to adapt")
        generator = generator or torch.Generator().manual_seed(0)
        modules = dict(model.named_modules())
        self.model, self.rank, self.enabled = model, rank, True
        self.modules: dict[str, nn.Module] = {}
        self.params: dict[str, torch.nn.Parameter] = {}  # "<path>.lora_A" / ".lora_B" / ".delta"
        self._handles: list = []
        self._weight_norms: dict[str, float] | None = None  # ‖W‖_F of each module, for ``ratios``
        for name in names:
            m = modules.get(name)
            if not isinstance(m, SUPPORTED):
                raise ConfigError(f"module {name!r} is {type(m).__name__}, not Linear/Conv2d")
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
                raise ConfigError(f"module {name!r}: grouped or non-zero-padded Conv2d is not supported")
            w = m.weight
            kw = dict(device=w.device, dtype=torch.float32)  # deltas are trained and stored in fp32
            if rank > 0:
                # drawn on CPU so that the initialisation does not depend on the device
                down = _kaiming_(torch.empty((rank, *w.shape[1:])), generator).to(w.device)
                up = torch.zeros((w.shape[0], rank, *([1] * (w.dim() - 2))), **kw)
                self.params[f"{name}.lora_A"] = nn.Parameter(down)
                self.params[f"{name}.lora_B"] = nn.Parameter(up)
            else:
                self.params[f"{name}.delta"] = nn.Parameter(torch.zeros(w.shape, **kw))
            self.modules[name] = m

    # -- hooks ----------------------------------------------------------------------------------------
    def delta_output(self, name: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``ΔW x`` of module ``name`` (``m``) for its input ``x``, differentiable in the deltas."""
        p = self.params
        if self.rank > 0:
            down, up = p[f"{name}.lora_A"], p[f"{name}.lora_B"]
            return project_up(m, project_down(m, x, down.to(x.dtype)), up.to(x.dtype))
        return project_down(m, x, p[f"{name}.delta"].to(x.dtype))

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            if not self.enabled:
                return None  # the module's own output, untouched
            x = args[0] if args else kwargs["input"]
            return output + self.delta_output(name, module, x).to(output.dtype)

        return hook

    def attach(self) -> Deltas:
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in self.modules.items()]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model: hooks return the modules' outputs unchanged."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    # -- data -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def ratios(self) -> dict[str, float]:
        """``‖ΔW‖_F / ‖W‖_F`` of each module (NaN/inf when ΔW is): how large its delta is next to its base weight.

        A low-rank ``ΔW = up @ down`` is never formed: ``‖U D‖²_F = Σ (UᵀU) ∘ (D Dᵀ)``, two r×r products.
        Modules whose base weight is zero have no scale to compare with and are left out.
        """
        if self._weight_norms is None:  # the base weights never change: measured once
            self._weight_norms = {n: m.weight.detach().double().norm().item() for n, m in self.modules.items()}
        names = [n for n, w in self._weight_norms.items() if w > 0]
        if not names:
            return {}
        norms = []
        for name in names:
            if self.rank > 0:
                down = self.params[f"{name}.lora_A"].double().flatten(1)
                up = self.params[f"{name}.lora_B"].double().flatten(1)
                norms.append(((up.T @ up) * (down @ down.T)).sum().clamp(min=0).sqrt())
            else:
                norms.append(self.params[f"{name}.delta"].double().norm())
        values = torch.stack(norms).tolist()  # one device sync for all modules
        return {n: v / self._weight_norms[n] for n, v in zip(names, values)}

    def export(self, prefix: str) -> dict[str, ModuleDelta]:
        """``{"<prefix>.<path>": ModuleDelta}``: detached fp32 CPU copies of the current deltas."""
        out = {}
        for name in self.modules:
            get = lambda s: self.params[f"{name}.{s}"].detach().float().cpu().clone()  # noqa: E731
            out[f"{prefix}.{name}"] = (ModuleDelta(down=get("lora_A"), up=get("lora_B")) if self.rank > 0
                                       else ModuleDelta(delta=get("delta")))
        return out

    def load(self, deltas: dict[str, ModuleDelta], prefix: str, weight: float = 1.0) -> None:
        """Copy ``ModuleDelta`` values (keys ``"<prefix>.<path>"``) into these deltas, scaled by ``weight``."""
        with torch.no_grad():
            for name in self.modules:
                d = deltas[f"{prefix}.{name}"]
                if self.rank > 0:
                    self.params[f"{name}.lora_A"].copy_(d.down)
                    self.params[f"{name}.lora_B"].copy_(d.up * weight)
                else:
                    self.params[f"{name}.delta"].copy_(d.dense() * weight)


@contextlib.contextmanager
def attach(model: nn.Module, names: list[str], rank: int, generator: torch.Generator | None = None) -> Iterator[Deltas]:
    """Attach trainable deltas for the duration of the block; the hooks are always removed on exit."""
    deltas = Deltas(model, names, rank, generator).attach()
    try:
        yield deltas
    finally:
        deltas.remove()


@contextlib.contextmanager
def applied(model: nn.Module, deltas: dict[str, ModuleDelta], prefix: str = "unet", weight: float = 1.0) -> Iterator[Deltas]:
    """Apply stored deltas (e.g. an ``Adapter``'s) to ``model`` with hooks for the duration of the block."""
    names = [k[len(prefix) + 1:] for k in deltas if k.startswith(prefix + ".")]
    ranks = {d.rank or 0 for k, d in deltas.items() if k.startswith(prefix + ".")}
    if len(ranks) != 1:
        raise ConfigError(f"deltas under {prefix!r} mix ranks {sorted(ranks)}; apply them one rank at a time")
    d = Deltas(model, names, ranks.pop())
    for p in d.params.values():
        p.requires_grad_(False)
    d.load(deltas, prefix, weight)
    d.attach()
    try:
        yield d
    finally:
        d.remove()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``requires_grad=False`` on every parameter of ``model`` for the block; previous flags restored after."""
    with frozen_params(model.parameters()):
        yield model


@contextlib.contextmanager
def frozen_params(params) -> Iterator[None]:
    """``requires_grad=False`` on the tensors ``params`` for the block (e.g. trained deltas while an attack
    optimises the prompt against them); previous flags restored after."""
    flags = {p: p.requires_grad for p in params}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
