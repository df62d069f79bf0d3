"""tinyworld's judge: a small CNN that says which shape, colour, texture and background an image shows.

It plays the role that NudeNet or an ImageNet ResNet-50 play in the erasure papers: an independent
classifier, trained on renders (and on renders passed through tinyworld's VAE, so that it reads
generated images as well as clean ones), that decides whether a concept is present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .world import ATTRIBUTES, canonical, concept_attribute

JUDGE_VERSION = "tinyworld-judge-1"


class JudgeNet(nn.Module):
    """Four-headed CNN over 32×32 RGB images in [-1, 1]."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 16×16
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),  # 8×8
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),  # 4×4
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(4 * w, len(ATTRIBUTES[a])) for a in ATTRIBUTES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {a: head(h) for a, head in self.heads.items()}


@dataclass
class Judgement:
    """Per-image probabilities for each attribute, and the argmax names."""

    probs: dict[str, torch.Tensor]  # attribute -> (N, n_classes)

    def labels(self, attribute: str) -> list[str]:
        names = list(ATTRIBUTES[attribute])
        return [names[i] for i in self.probs[attribute].argmax(-1).tolist()]

    def prob(self, concept: str) -> torch.Tensor:
        """(N,) probability that each image shows ``concept`` (a canonical name or synonym)."""
        attribute = concept_attribute(concept)
        return self.probs[attribute][:, list(ATTRIBUTES[attribute]).index(canonical(concept))]

    def shows(self, concept: str) -> torch.Tensor:
        """(N,) bool: the judge's top class for the concept's attribute is the concept."""
        attribute = concept_attribute(concept)
        return self.probs[attribute].argmax(-1) == list(ATTRIBUTES[attribute]).index(canonical(concept))


class TinyworldJudge:
    """Callable judge: ``judge(images) -> Judgement``; images are PIL images, uint8 arrays or tensors."""

    name = "tinyworld"
    version = JUDGE_VERSION
    threshold = 0.5  # used by ``score``: an image shows a concept if its probability exceeds this

    def __init__(self, net: JudgeNet, device: str | torch.device = "cpu"):
        self.net = net.eval().to(device)
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "TinyworldJudge":
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        net = JudgeNet(width=config["width"])
        net.load_state_dict(load_file(str(directory / "model.safetensors")))
        return cls(net, device)

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        width = self.net.heads["shape"].in_features // 4
        (directory / "config.json").write_text(json.dumps({"width": width, "version": self.version}, indent=2))
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(directory / "model.safetensors"))

    @staticmethod
    def to_tensor(images) -> torch.Tensor:
        """PIL list / uint8 (N,H,W,3) / float (N,3,H,W) in [-1,1] → float (N,3,32,32) in [-1,1]."""
        if isinstance(images, torch.Tensor) and images.dtype.is_floating_point:
            x = images
        else:
            if not isinstance(images, np.ndarray):
                images = np.stack([np.asarray(im.convert("RGB")) for im in images])
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        if x.shape[-1] != 32:
            x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
        return x

    @torch.no_grad()
    def __call__(self, images, batch_size: int = 256) -> Judgement:
        x = self.to_tensor(images)
        outs: dict[str, list[torch.Tensor]] = {a: [] for a in ATTRIBUTES}
        for i in range(0, len(x), batch_size):
            logits = self.net(x[i:i + batch_size].to(self.device))
            for a in ATTRIBUTES:
                outs[a].append(logits[a].float().softmax(-1).cpu())
        return Judgement({a: torch.cat(v) for a, v in outs.items()})

    def score(self, images, concept: str) -> list[float]:
        """The judge protocol shared with other judges: per-image probability of ``concept``."""
        return self(images).prob(concept).tolist()
