"""Geometry read from a graphviz SVG: edge paths sampled to points, text boxes approximated from their font size.

Used by the diagram tests to check that no edge runs through a caption or a label: a text's box is its
anchor, width ``0.5 × font-size`` per character (a node's text clipped to its drawn box) and height one font size; an edge's cubic Béziers are
sampled at 24 points each. Only the edge's own label is exempt.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

SVG = "{http://www.w3.org/2000/svg}"
_NUM = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class TextBox:
    text: str
    owner: str  # the title of the node, edge or cluster group that holds it
    kind: str  # node, edge, cluster, graph
    x0: float
    y0: float
    x1: float
    y1: float

    def holds(self, x: float, y: float, margin: float = 1.0) -> bool:
        return self.x0 + margin < x < self.x1 - margin and self.y0 + margin < y < self.y1 - margin


@dataclass(frozen=True)
class EdgePath:
    owner: str
    points: list[tuple[float, float]]


def _bezier(pts: list[tuple[float, float]], n: int = 24) -> list[tuple[float, float]]:
    out = [pts[0]]
    for i in range(0, len(pts) - 3, 3):
        p0, p1, p2, p3 = pts[i:i + 4]
        for k in range(1, n + 1):
            t = k / n
            a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t * t, t ** 3
            out.append((a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0], a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1]))
    return out


def _path_points(d: str) -> list[tuple[float, float]]:
    nums = [float(v) for v in _NUM.findall(d)]
    pts = list(zip(nums[0::2], nums[1::2]))
    return _bezier(pts) if len(pts) >= 4 else pts


def _shape_box(g: ET.Element) -> tuple[float, float] | None:
    """The left and right of a node's drawn shape (its first path or polygon), where it has one."""
    for el in g.iter():
        tag = el.tag.removeprefix(SVG)
        data = el.get("d") if tag == "path" else el.get("points") if tag == "polygon" else None
        if data:
            xs = [float(v) for v in _NUM.findall(data)][0::2]
            return (min(xs), max(xs)) if xs else None
    return None


def read(svg: str) -> tuple[list[TextBox], list[EdgePath]]:
    """The text boxes and edge paths of one SVG drawing (in the drawing's own coordinates)."""
    root = ET.fromstring(svg)
    texts: list[TextBox] = []
    edges: list[EdgePath] = []
    for g in root.iter(f"{SVG}g"):
        kind = g.get("class", "")
        if kind not in ("node", "edge", "cluster", "graph"):
            continue
        title = g.findtext(f"{SVG}title") or ""
        if kind == "edge":
            for p in g.findall(f"{SVG}path"):
                edges.append(EdgePath(title, _path_points(p.get("d", ""))))
        shape = _shape_box(g) if kind == "node" else None
        for t in g.iter(f"{SVG}text") if kind != "graph" else g.findall(f"{SVG}text"):
            content = "".join(t.itertext()).strip()
            if not content:
                continue
            fs = float(t.get("font-size", "10"))
            x, y = float(t.get("x", "0")), float(t.get("y", "0"))
            w = 0.5 * fs * len(content)
            anchor = t.get("text-anchor", "start")
            x0 = x - w / 2 if anchor == "middle" else x - w if anchor == "end" else x
            x1 = x0 + w
            if shape is not None:  # a node's text lies inside its drawn box (the estimate can run past it)
                x0, x1 = max(x0, shape[0]), min(x1, shape[1])
            texts.append(TextBox(content, title, kind, x0, y - 0.8 * fs, x1, y + 0.2 * fs))
    return texts, edges


def crossings(svg: str, kinds: tuple[str, ...] = ("node", "edge", "cluster", "graph")) -> list[str]:
    """Each (edge, text) pair where the edge's path runs through the text's box, the edge's own label exempt."""
    texts, edges = read(svg)
    out = []
    for e in edges:
        for t in texts:
            if t.kind not in kinds or (t.kind == "edge" and t.owner == e.owner):
                continue
            if any(t.holds(x, y) for x, y in e.points):
                out.append(f"edge {e.owner} crosses {t.kind} text {t.text!r} ({t.owner})")
    return out
