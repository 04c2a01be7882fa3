"""Where a laid-out drawing's edges run through edge labels: read from ``dot``'s SVG output.

Edge paths (cubic Béziers) are sampled; each edge label's box is taken from its anchor and font size (width
``0.55 × font size`` per character, height one font size: a little wider than the text). :func:`crossed_labels`
names the labelled edges whose label another edge runs through, so that :func:`pefref.render.dot.render_graph`
can lay the drawing out again with those labels as nodes on their edges (``dot`` routes around nodes).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

__all__ = ["crossed_labels"]

_SVG = "{http://www.w3.org/2000/svg}"
_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_ARROW = "->"


@dataclass(frozen=True)
class _Box:
    edge: str
    x0: float
    y0: float
    x1: float
    y1: float

    def holds(self, x: float, y: float) -> bool:
        return self.x0 < x < self.x1 and self.y0 < y < self.y1


def _sample(d: str, n: int = 24) -> list[tuple[float, float]]:
    nums = [float(v) for v in _NUM.findall(d)]
    pts = list(zip(nums[0::2], nums[1::2]))
    if len(pts) < 4:
        return pts
    out = [pts[0]]
    for i in range(0, len(pts) - 3, 3):
        p0, p1, p2, p3 = pts[i:i + 4]
        for k in range(1, n + 1):
            t = k / n
            a, b, c, e = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t * t, t ** 3
            out.append((a * p0[0] + b * p1[0] + c * p2[0] + e * p3[0], a * p0[1] + b * p1[1] + c * p2[1] + e * p3[1]))
    return out


def _label_box(edge: str, t: ET.Element) -> _Box | None:
    text = "".join(t.itertext()).strip()
    if not text:
        return None
    fs = float(t.get("font-size", "8"))
    x, y = float(t.get("x", "0")), float(t.get("y", "0"))
    w = 0.55 * fs * len(text)
    anchor = t.get("text-anchor", "start")
    x0 = x - w / 2 if anchor == "middle" else x - w if anchor == "end" else x
    return _Box(edge, x0, y - 0.85 * fs, x0 + w, y + 0.25 * fs)


def crossed_labels(svg: bytes | str) -> set[tuple[str, str]]:
    """The (tail, head) of each labelled edge whose label some other edge runs through."""
    root = ET.fromstring(svg.decode("utf-8") if isinstance(svg, bytes) else svg)
    boxes: list[_Box] = []
    paths: list[tuple[str, list[tuple[float, float]]]] = []
    for g in root.iter(f"{_SVG}g"):
        if g.get("class") != "edge":
            continue
        title = g.findtext(f"{_SVG}title") or ""
        paths += [(title, _sample(p.get("d", ""))) for p in g.findall(f"{_SVG}path")]
        boxes += [b for t in g.iter(f"{_SVG}text") if (b := _label_box(title, t)) is not None]
    crossed = {b.edge for b in boxes for title, pts in paths if title != b.edge and any(b.holds(x, y) for x, y in pts)}
    return {(u, v) for u, _, v in (e.partition(_ARROW) for e in crossed)}
