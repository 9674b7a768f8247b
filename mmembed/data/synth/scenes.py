"""Procedural natural "scenes": coloured, textured shapes in five slots on a coloured background.

A :class:`Scene` is pure attributes (plus small render jitter), so captions, questions, edits and the rules that
decide whether a text truly describes an image are all computed from the same data that is drawn.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "pentagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (150, 150, 150),
    "sand": (225, 205, 160),
    "sky": (165, 205, 240),
    "mint": (175, 230, 195),
    "lavender": (205, 190, 235),
    "charcoal": (60, 62, 70),
}
SIZES: dict[str, float] = {"small": 0.07, "medium": 0.1, "large": 0.135}  # half-extent / image side
TEXTURES = ("solid", "striped", "dotted")
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5),
    "top": (0.5, 0.2),
    "center": (0.5, 0.5),
    "bottom": (0.5, 0.8),
    "right": (0.8, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PLURALS = {s: s + "es" if s.endswith("s") else s + "s" for s in SHAPES}
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five")


@dataclass(frozen=True)
class Obj:
    """One shape in a slot; ``dx``, ``dy`` (fractions of the side) and ``scale`` are render jitter only."""

    shape: str
    color: str
    size: str
    position: str
    texture: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    @property
    def look(self) -> tuple[str, str, str]:
        """What a crop of this object shows: (colour, texture, shape)."""
        return (self.color, self.texture, self.shape)

    def phrase(self, size: bool = True, position: bool = False) -> str:
        words = ([self.size] if size else []) + [self.color, self.texture, self.shape]
        return " ".join(words) + (f" {POSITION_PHRASES[self.position]}" if position else "")

    def bbox(self, side: int, margin: float = 0.0) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1) of the shape in a ``side`` x ``side`` render, grown by ``margin`` x radius."""
        cx, cy, r = self._geometry(side)
        r = r * (1.0 + margin)
        return (max(0, int(cx - r)), max(0, int(cy - r)), min(side, int(math.ceil(cx + r))), min(side, int(cy + r) + 1))

    def _geometry(self, side: int) -> tuple[float, float, float]:
        px, py = POSITIONS[self.position]
        return (px + self.dx) * side, (py + self.dy) * side, SIZES[self.size] * self.scale * side


@dataclass(frozen=True)
class Scene:
    """A background and up to five objects in distinct slots (kept in slot order)."""

    background: str
    objects: tuple[Obj, ...]
    tint: int = 0  # brightness offset of the background, render jitter only

    def __post_init__(self) -> None:
        order = list(POSITIONS)
        ordered = tuple(sorted(self.objects, key=lambda o: order.index(o.position)))
        object.__setattr__(self, "objects", ordered)
        if len({o.position for o in ordered}) != len(ordered):
            raise ValueError("two objects share a slot")

    @property
    def signature(self) -> tuple:
        """Attributes without jitter: two scenes with equal signatures show the same thing."""
        return (self.background, tuple((o.shape, o.color, o.size, o.position, o.texture) for o in self.objects))

    def short_keys(self) -> set[tuple[str, str, str, str]]:
        """Keys of all short captions true for this scene: (background, colour, texture, shape)."""
        return {(self.background, *o.look) for o in self.objects}

    def pair_keys(self) -> set[tuple]:
        """Keys of all two-object captions true for this scene (colour, shape, position of each, slot order)."""
        objs = self.objects
        return {
            ((a.color, a.shape, a.position), (b.color, b.shape, b.position))
            for i, a in enumerate(objs)
            for b in objs[i + 1 :]
        }

    def free_positions(self) -> list[str]:
        used = {o.position for o in self.objects}
        return [p for p in POSITIONS if p not in used]

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def to_meta(self) -> dict:
        return {
            "background": self.background,
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "position": o.position, "texture": o.texture}
                for o in self.objects
            ],
        }


def an(phrase: str) -> str:
    """``phrase`` with its indefinite article ("a red circle", "an orange star")."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def short_caption(scene: Scene, obj: Obj) -> str:
    return f"{an(obj.color)} {obj.texture} {obj.shape} on a {scene.background} background"


def long_caption(scene: Scene) -> str:
    parts = [an(o.phrase(position=True)) for o in scene.objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"A {scene.background} background with {listed}."


def pair_caption(a: Obj, b: Obj) -> str:
    first, second = (f"{an(o.color)} {o.shape} {POSITION_PHRASES[o.position]}" for o in (a, b))
    return f"{first} and {second}"


def referring_phrase(scene: Scene, obj: Obj) -> str:
    """The shortest of "the circle", "the red circle", "the red striped circle", "... on the left" that is unique."""
    for fields in (("shape",), ("color", "shape"), ("color", "texture", "shape")):
        same = [o for o in scene.objects if all(getattr(o, f) == getattr(obj, f) for f in fields)]
        if len(same) == 1:
            return "the " + " ".join(getattr(obj, f) for f in fields)
    return f"the {obj.color} {obj.shape} {POSITION_PHRASES[obj.position]}"


def _contrasts(color: str, background: str) -> bool:
    c, b = COLORS[color], BACKGROUNDS[background]
    return math.dist(c, b) > 110


def random_object(rng: random.Random, position: str, background: str, **fixed: str) -> Obj:
    """A random object in ``position`` whose colour contrasts with the background; ``fixed`` pins attributes."""
    colors = [c for c in COLORS if _contrasts(c, background)]
    color = fixed.get("color") or rng.choice(colors)
    return Obj(
        shape=fixed.get("shape") or rng.choice(SHAPES),
        color=color,
        size=fixed.get("size") or rng.choice(list(SIZES)),
        position=position,
        texture=fixed.get("texture") or rng.choice(TEXTURES),
        dx=rng.uniform(-0.025, 0.025),
        dy=rng.uniform(-0.025, 0.025),
        scale=rng.uniform(0.92, 1.08),
    )


def random_scene(
    rng: random.Random, n_objects: tuple[int, int] = (1, 4), background: str | None = None, distinct_looks: bool = True
) -> Scene:
    """A random scene with ``n_objects`` (inclusive range) objects in random slots.

    Args:
        distinct_looks: No two objects share (colour, texture, shape), so each has a unique visual referent.
    """
    background = background or rng.choice(list(BACKGROUNDS))
    n = rng.randint(*n_objects)
    objs: list[Obj] = []
    for pos in rng.sample(list(POSITIONS), n):
        for _ in range(20):
            o = random_object(rng, pos, background)
            if not distinct_looks or all(o.look != p.look for p in objs):
                break
        objs.append(o)
    return Scene(background, tuple(objs), tint=rng.randint(-8, 8))


def rejitter(scene: Scene, rng: random.Random, strength: float = 1.0) -> Scene:
    """The same scene rendered slightly differently (NIGHTS-like near duplicate)."""
    objs = tuple(
        replace(
            o,
            dx=max(-0.04, min(0.04, o.dx + rng.uniform(-0.02, 0.02) * strength)),
            dy=max(-0.04, min(0.04, o.dy + rng.uniform(-0.02, 0.02) * strength)),
            scale=max(0.85, min(1.15, o.scale * rng.uniform(1 - 0.06 * strength, 1 + 0.06 * strength))),
        )
        for o in scene.objects
    )
    return Scene(scene.background, objs, tint=max(-15, min(15, scene.tint + rng.randint(-6, 6))))


def edit_scene(scene: Scene, rng: random.Random, kind: str | None = None) -> tuple[Scene, str]:
    """Apply one CIRR-like edit; returns the edited scene and the instruction that describes it."""
    kinds = ["color", "shape", "texture", "size"]
    if len(scene.objects) >= 2:
        kinds.append("remove")
    if scene.free_positions():
        kinds.append("add")
    kind = kind if kind in kinds else rng.choice(kinds)
    objs = list(scene.objects)
    if kind == "add":
        pos = rng.choice(scene.free_positions())
        new = random_object(rng, pos, scene.background)
        text = f"add {an(new.color)} {new.texture} {new.shape} {POSITION_PHRASES[pos]}"
        return Scene(scene.background, (*objs, new), scene.tint), text
    i = rng.randrange(len(objs))
    target, ref = objs[i], referring_phrase(scene, objs[i])
    if kind == "remove":
        del objs[i]
        return Scene(scene.background, tuple(objs), scene.tint), f"remove {ref}"
    if kind == "color":
        value = rng.choice([c for c in COLORS if c != target.color and _contrasts(c, scene.background)])
        objs[i], text = replace(target, color=value), f"make {ref} {value}"
    elif kind == "shape":
        value = rng.choice([s for s in SHAPES if s != target.shape])
        objs[i], text = replace(target, shape=value), f"turn {ref} into {an(value)}"
    elif kind == "texture":
        value = rng.choice([t for t in TEXTURES if t != target.texture])
        objs[i], text = replace(target, texture=value), f"make {ref} {value}"
    else:
        order = list(SIZES)
        j = order.index(target.size)
        bigger = j == 0 or (j == 1 and rng.random() < 0.5)
        objs[i] = replace(target, size=order[j + 1] if bigger else order[j - 1])
        text = f"make {ref} {'bigger' if bigger else 'smaller'}"
    return Scene(scene.background, tuple(objs), scene.tint), text


# --------------------------------------------------------------------------------------------------------- drawing
def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, start: float, radii: tuple[float, ...]) -> list[tuple[float, float]]:
        pts = []
        for k in range(n * len(radii)):
            a = math.radians(start + k * 360.0 / (n * len(radii)))
            rr = radii[k % len(radii)] * r
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)]
    if shape == "star":
        return ring(5, -90.0, (1.0, 0.45))
    if shape == "hexagon":
        return ring(6, 0.0, (1.0,))
    if shape == "pentagon":
        return ring(5, -90.0, (1.0,))
    if shape == "cross":
        a, b = 0.33 * r, r
        offsets = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                   (-a, -a)]
        return [(cx + x, cy + y) for x, y in offsets]
    raise ValueError(f"unknown shape {shape!r}")


def _shade(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """A contrasting tone of the same hue for stripes and dots."""
    if sum(color) < 200:
        return tuple(int(c + (255 - c) * 0.55) for c in color)  # type: ignore[return-value]
    return tuple(int(c * 0.45) for c in color)  # type: ignore[return-value]


def draw_object(canvas: Image.Image, obj: Obj) -> None:
    """Draw ``obj`` onto ``canvas`` (square, RGB) in place."""
    side = canvas.size[0]
    cx, cy, r = obj._geometry(side)
    x0, y0 = int(cx - r) - 1, int(cy - r) - 1
    w = int(2 * r) + 3
    mask = Image.new("L", (w, w), 0)
    md = ImageDraw.Draw(mask)
    lx, ly = cx - x0, cy - y0
    if obj.shape == "circle":
        md.ellipse((lx - r, ly - r, lx + r, ly + r), fill=255)
    else:
        md.polygon(_shape_points(obj.shape, lx, ly, r), fill=255)
    color = COLORS[obj.color]
    layer = Image.new("RGB", (w, w), color)
    if obj.texture != "solid":
        ld = ImageDraw.Draw(layer)
        shade = _shade(color)
        step = max(5, int(r / 2.6))
        if obj.texture == "striped":
            width = max(2, step // 2)
            for k in range(-w, 2 * w, step):
                ld.line((k, 0, k + w, w), fill=shade, width=width)
        else:
            dot = max(1.5, step / 3.5)
            for yy in range(step // 2, w, step):
                for xx in range(step // 2 + (yy // step % 2) * step // 2, w, step):
                    ld.ellipse((xx - dot, yy - dot, xx + dot, yy + dot), fill=shade)
    canvas.paste(layer, (x0, y0), mask)


def render(scene: Scene, side: int = 256) -> Image.Image:
    """Draw the scene as a ``side`` x ``side`` RGB image."""
    bg = tuple(max(0, min(255, c + scene.tint)) for c in BACKGROUNDS[scene.background])
    canvas = Image.new("RGB", (side, side), bg)  # type: ignore[arg-type]
    for obj in scene.objects:
        draw_object(canvas, obj)
    return canvas


def crop_object(image: Image.Image, obj: Obj, margin: float = 0.2) -> Image.Image:
    """The object's region of a render of its scene (the grounding target)."""
    return image.crop(obj.bbox(image.size[0], margin))
