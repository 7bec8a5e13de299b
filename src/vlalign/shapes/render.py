"""Rendering shapes-world scenes with PIL.

Each shape is a filled polygon (or an ellipse) in a unit box ``[-1, 1]^2`` scaled to the object's
size; scenes are drawn at ``supersample`` times the target resolution and downsampled with a box
filter, which keeps edges smooth and shapes legible at 48-112 pixels.
"""

from __future__ import annotations

import math
from functools import cache

from PIL import Image, ImageDraw

from vlalign.shapes.vocabulary import COLOUR_RGB
from vlalign.shapes.world import Scene, WorldConfig, WorldObject

Point = tuple[float, float]


def _regular(n: int, radius: float = 1.0, phase_deg: float = -90.0) -> list[Point]:
    return [
        (
            radius * math.cos(math.radians(phase_deg + 360.0 * k / n)),
            radius * math.sin(math.radians(phase_deg + 360.0 * k / n)),
        )
        for k in range(n)
    ]


def _star(points: int = 5, inner: float = 0.45) -> list[Point]:
    outer = _regular(points)
    inner_pts = _regular(points, inner, -90.0 + 180.0 / points)
    return [p for pair in zip(outer, inner_pts) for p in pair]


def _cross(arm: float = 0.34) -> list[Point]:
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def _heart(n: int = 40) -> list[Point]:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -(y + 2.5) / 14.5))
    return pts


@cache
def shape_outline(shape: str) -> tuple[Point, ...]:
    """The polygon of ``shape`` in the unit box (empty for the circle, drawn as an ellipse)."""
    outlines: dict[str, list[Point]] = {
        "circle": [],
        "square": [(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)],
        "triangle": [(0.0, -1.0), (1.0, 0.9), (-1.0, 0.9)],
        "star": _star(),
        "diamond": [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)],
        "cross": _cross(),
        "hexagon": _regular(6, 1.0, 0.0),
        "heart": _heart(),
    }
    if shape not in outlines:
        raise ValueError(f"cannot draw shape {shape!r}; known shapes: {sorted(outlines)}")
    return tuple(outlines[shape])


def draw_object(draw: ImageDraw.ImageDraw, obj: WorldObject, side: float) -> None:
    """Paint ``obj`` on a canvas of ``side`` pixels."""
    cx, cy, half = obj.x * side, obj.y * side, obj.size * side / 2
    fill = COLOUR_RGB[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
        return
    draw.polygon([(cx + px * half, cy + py * half) for px, py in shape_outline(obj.shape)], fill=fill)


def render_scene(scene: Scene, cfg: WorldConfig, image_size: int | None = None) -> Image.Image:
    """The RGB image of ``scene`` at ``image_size`` pixels (default ``cfg.image_size``)."""
    size = image_size or cfg.image_size
    big = size * cfg.supersample
    canvas = Image.new("RGB", (big, big), tuple(cfg.background))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        draw_object(draw, obj, big)
    if cfg.supersample == 1:
        return canvas
    return canvas.resize((size, size), Image.Resampling.BOX)
