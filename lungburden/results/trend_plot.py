"""Small pictures shared by the SC summary image and the PDF report: the burden trend plot and
the lung-zone table text (no patient data)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lungburden.quantify import ZoneInvolvement

_ZONE_LETTERS = {"upper": "upper", "middle": "middle", "lower": "lower"}


def zone_lines(zones: ZoneInvolvement) -> list[str]:
    """Three lines (upper, middle, lower) of ``right % (score)  left % (score)``, then the total."""
    lines = []
    for name in ("upper", "middle", "lower"):
        right, left = zones.zone("right", name), zones.zone("left", name)
        lines.append(f"{_ZONE_LETTERS[name]:<7} R {right.involvement_percent:5.1f} % ({right.score})"
                     f"   L {left.involvement_percent:5.1f} % ({left.score})")
    lines.append(f"Zone score {zones.total_score}/30 (equal-height thirds of each lung, not lobes)")
    return lines


def render_trend(points: Sequence[tuple[int, float]], width: int = 480, height: int = 160) -> np.ndarray:
    """Burden (%) over days relative to the current study (0), RGB uint8 on black.

    ``points``: (days, burden %) oldest first; the last one is the current study.
    """
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(9, height // 12))
    left, right, top, bottom = width // 9, width - width // 30, height // 8, height - height // 5
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(170, 170, 170))
    if not points:
        return np.asarray(canvas)
    days = [d for d, _ in points]
    values = [v for _, v in points]
    d0, d1 = min(days), max(max(days), min(days) + 1)
    vmax = max(10.0, float(np.ceil(max(values) / 10.0) * 10.0))

    def xy(day: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (day - d0) / (d1 - d0) if len(points) > 1 else (left + right) / 2
        return x, bottom - (bottom - top) * value / vmax

    for fraction in (0.0, 0.5, 1.0):
        y = bottom - (bottom - top) * fraction
        draw.text((2, y - height // 24), f"{vmax * fraction:.0f} %", fill=(170, 170, 170), font=font)
    coords = [xy(d, v) for d, v in points]
    if len(coords) > 1:
        draw.line(coords, fill=(255, 220, 0), width=2)
    for (x, y), (day, value) in zip(coords, points, strict=True):
        r = 3
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))
        for text, ty, colour in ((f"{value:.1f}", y - height // 8, (255, 255, 255)),
                                 ("now" if day == 0 else f"{day} d", bottom + 3, (170, 170, 170))):
            tx = min(x - r * 3, width - draw.textlength(text, font=font) - 2)
            draw.text((tx, ty), text, fill=colour, font=font)
    return np.asarray(canvas)
