"""The tinyworld: a procedurally rendered world of shapes whose concepts are known.

Every image shows one shape of one colour with one texture on one background. Texture plays the role
that artistic style plays in Stable Diffusion: it changes how a thing is drawn, not what it is.
Every concept has a canonical name and synonyms, so that erasing by name and leaking through a synonym
or an adversarial prompt are measurable, as they are on Stable Diffusion.

Vocabulary used in training (all of it; see ``TRAIN_TEMPLATES`` / ``HELDOUT_TEMPLATES``):

* every canonical name and every synonym below appears in training captions, each with equal probability;
* captions are built from ``TRAIN_TEMPLATES``; ``HELDOUT_TEMPLATES`` never appear in training and are
  used by evaluation to measure paraphrase generalisation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32

# attribute -> concept -> synonyms (canonical name first)
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "three sided shape"),
    "star": ("star", "five pointed star", "starburst"),
    "cross": ("cross", "plus sign", "plus shape"),
    "diamond": ("diamond", "rhombus", "lozenge"),
}
COLOURS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "amber", "tangerine"),
}
TEXTURES: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain", "filled"),
    "striped": ("striped", "stripy", "banded"),
    "dotted": ("dotted", "spotted", "polka dot"),
    "outlined": ("outlined", "hollow", "line drawn"),
}
BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "black": ("black background", "dark background", "night sky"),
    "white": ("white background", "snowfield", "blank page"),
    "checkerboard": ("checkerboard", "chessboard", "tiled floor"),
}
ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "texture": TEXTURES,
    "background": BACKGROUNDS,
}

RGB = {
    "red": (220, 30, 30),
    "green": (40, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "orange": (250, 140, 20),
}

# Templates: {shape} {colour} {texture} {background} take a name or synonym; a [bracketed segment] is
# dropped when an attribute inside it is left out of the caption.
TRAIN_TEMPLATES = (
    "a [{texture} ][{colour} ]{shape}[ on a {background}]",
    "a [{colour} ]{shape}[, {texture}][, {background}]",
    "a picture of a [{texture} ][{colour} ]{shape}[ on a {background}]",
    "[{colour} ]{shape}[ {texture}][ {background}]",
)
HELDOUT_TEMPLATES = (
    "an image showing a [{texture} ][{colour} ]{shape}[ over a {background}]",
    "a drawing of a [{colour} ]{shape}[ that is {texture}][, with a {background}]",
)
# the evaluation grid's fixed template (canonical prompts)
CANONICAL_TEMPLATE = "a {texture} {colour} {shape} on a {background}"

_SEGMENT = re.compile(r"\[([^\]]*)\]")


def fill_template(template: str, words: dict[str, str]) -> str:
    """Fill a template; a [segment] whose attribute word is empty disappears."""

    def segment(match: re.Match) -> str:
        inner = match.group(1)
        keys = re.findall(r"{(\w+)}", inner)
        return inner.format(**words) if all(words.get(k) for k in keys) else ""

    return " ".join(_SEGMENT.sub(segment, template).format(**words).split())


def concept_names() -> list[str]:
    """Every attribute's values, canonical names, attribute by attribute ("circle", ..., "red", ...)."""
    return [name for table in ATTRIBUTES.values() for name in table]


def concept_attribute(concept: str) -> str:
    """Return which attribute ('shape', 'colour', ...) a canonical concept or synonym belongs to."""
    for attribute, table in ATTRIBUTES.items():
        for name, names in table.items():
            if concept == name or concept in names:
                return attribute
    raise KeyError(f"unknown tinyworld concept {concept!r}; known concepts: {', '.join(concept_names())}")


def canonical(concept: str) -> str:
    """Map a synonym to its canonical concept name ('disc' -> 'circle')."""
    table = ATTRIBUTES[concept_attribute(concept)]
    return next(name for name, names in table.items() if concept == name or concept in names)


def synonyms(concept: str) -> tuple[str, ...]:
    """All names of a concept, canonical first."""
    name = canonical(concept)
    return ATTRIBUTES[concept_attribute(name)][name]


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    texture: str
    background: str

    def labels(self) -> dict[str, int]:
        """Class index of each attribute, in ``ATTRIBUTES`` order."""
        return {a: list(ATTRIBUTES[a]).index(getattr(self, a)) for a in ATTRIBUTES}

    def prompt(self, template: str = CANONICAL_TEMPLATE, names: dict[str, str] | None = None) -> str:
        """The scene's prompt; ``names`` overrides an attribute's word (e.g. {"shape": "disc"})."""
        words = {a: ATTRIBUTES[a][getattr(self, a)][0] for a in ATTRIBUTES}
        words.update(names or {})
        return fill_template(template, words)


def random_scene(rng: random.Random) -> Scene:
    return Scene(*(rng.choice(list(ATTRIBUTES[a])) for a in ATTRIBUTES))


def caption(scene: Scene, rng: random.Random, templates=TRAIN_TEMPLATES, drop: float = 0.15) -> str:
    """A training caption: random template, random synonym per attribute; each of colour, texture and
    background is left out with probability ``drop`` (so "a circle" means a circle of any colour)."""
    words = {}
    for attribute in ATTRIBUTES:
        dropped = attribute != "shape" and rng.random() < drop
        words[attribute] = "" if dropped else rng.choice(ATTRIBUTES[attribute][getattr(scene, attribute)])
    return fill_template(rng.choice(templates), words)


# ---------------------------------------------------------------- rendering

def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean mask of a shape on a size×size grid (called at supersampled resolution)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if shape == "diamond":
        return np.abs(u) / (r * 0.75) + np.abs(v) / r <= 1.0
    if shape == "cross":
        w = r * 0.36
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if shape == "triangle":
        return _polygon(u, v, [(0.0, -r), (r * 0.95, r * 0.72), (-r * 0.95, r * 0.72)])
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            t = -np.pi / 2 + k * np.pi / 5
            pts.append((rad * np.cos(t), rad * np.sin(t)))
        return _polygon(u, v, pts)
    raise KeyError(shape)


def _polygon(u: np.ndarray, v: np.ndarray, pts) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        x1, y1 = pts[i]
        x2, y2 = pts[(i + 1) % n]
        crosses = ((y1 > v) != (y2 > v)) & (u < (x2 - x1) * (v - y1) / (y2 - y1 + 1e-12) + x1)
        inside ^= crosses
    return inside


def render(scene: Scene, rng: random.Random | None = None, size: int = IMAGE_SIZE, ss: int = 4) -> np.ndarray:
    """Render a scene to an (size, size, 3) uint8 array. ``rng`` jitters position, size and rotation."""
    rng = rng or random.Random(0)
    big = size * ss
    # background
    yy, xx = np.mgrid[0:big, 0:big]
    if scene.background == "black":
        bg = np.zeros((big, big, 3), np.float32) + 15
    elif scene.background == "white":
        bg = np.zeros((big, big, 3), np.float32) + 240
    else:  # checkerboard of two greys, 8-pixel cells at output resolution
        cell = 8 * ss
        on = ((xx // cell) + (yy // cell)) % 2 == 0
        bg = np.where(on[..., None], 150.0, 95.0).astype(np.float32) * np.ones(3, np.float32)
    scale = big / 32.0
    r = rng.uniform(9.0, 12.0) * scale
    cx = big / 2 + rng.uniform(-2.5, 2.5) * scale
    cy = big / 2 + rng.uniform(-2.5, 2.5) * scale
    angle = rng.uniform(-0.25, 0.25) if scene.shape != "circle" else 0.0
    mask = _shape_mask(scene.shape, big, cx, cy, r, angle)
    colour = np.array(RGB[scene.colour], np.float32)
    dark = colour * 0.35
    fill = np.broadcast_to(colour, (big, big, 3)).copy()
    if scene.texture == "striped":  # diagonal bands, period 6 px at output resolution
        band = (((xx + yy) // (3 * ss)) % 2 == 0)
        fill[band] = dark
    elif scene.texture == "dotted":  # dark dots on a 6-px lattice
        p = 6 * ss
        off = rng.randrange(p)
        ddx = ((xx + off) % p) - p / 2
        ddy = ((yy + off) % p) - p / 2
        fill[ddx * ddx + ddy * ddy <= (1.3 * ss) ** 2] = dark
    elif scene.texture == "outlined":  # a 2-px contour, background inside
        inner = _shape_mask(scene.shape, big, cx, cy, r - 2.6 * scale, angle)
        mask = mask & ~inner
    img = np.where(mask[..., None], fill, bg)
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def grid_scenes(textures=None, backgrounds=None) -> list[Scene]:
    """The standard evaluation grid: every shape × colour, crossed with the given textures/backgrounds."""
    textures = textures or ["solid"]
    backgrounds = backgrounds or ["black"]
    return [Scene(s, c, t, b) for s in SHAPES for c in COLOURS for t in textures for b in backgrounds]
