"""Exam level: a screening exam is read per breast, with its two views side by side.

Why nipple distance: the CC and MLO views project the same breast along different directions, so a lesion's
position in one view does not give its position in the other, but its distance from the nipple is nearly kept
(the radial distance a reader uses to look for a finding in the other view: within about 1 cm).  A cluster in
the CC and a cluster in the MLO of the same breast are one lesion seen in both views when their nipple distances
differ by at most ``CROSS_VIEW_TOLERANCE_MM`` (pairs matched one to one, closest first).

Images come in canonical orientation (chest wall on the left edge, as :mod:`.normalize` stores them), so the
nipple is the breast's point farthest from the chest wall: the middle of its right-most column.
"""
from __future__ import annotations

import numpy as np

CROSS_VIEW_TOLERANCE_MM = 10.0
CC_VIEWS = ("CC", "XCCL")
OBLIQUE_VIEWS = ("MLO", "ML", "LM")


def nipple_xy_px(breast: np.ndarray) -> tuple[float, float] | None:
    """(column, row) of the nipple in a canonical breast mask: the middle of the breast's right-most column."""
    cols = np.flatnonzero(np.asarray(breast, dtype=bool).any(axis=0))
    if not len(cols):
        return None
    c = int(cols[-1])
    rows = np.flatnonzero(breast[:, c])
    return float(c), float(rows[len(rows) // 2])


def nipple_distance_mm(xy_mm, nipple_mm) -> float:
    return float(np.hypot(xy_mm[0] - nipple_mm[0], xy_mm[1] - nipple_mm[1]))


def cross_view_pairs(cc: list[dict], oblique: list[dict], *, tolerance_mm: float = CROSS_VIEW_TOLERANCE_MM
                     ) -> list[tuple[int, int]]:
    """Index pairs (cc, oblique) of findings seen in both views: nipple distances (``nipple_distance_mm``) within
    ``tolerance_mm``, one to one, closest first."""
    pairs = sorted((abs(a["nipple_distance_mm"] - b["nipple_distance_mm"]), i, j)
                   for i, a in enumerate(cc) for j, b in enumerate(oblique))
    used_a, used_b, out = set(), set(), []
    for diff, i, j in pairs:
        if diff > tolerance_mm:
            break
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((i, j))
    return sorted(out)


def breast_summaries(images: list[dict], findings: list[dict], *,
                     tolerance_mm: float = CROSS_VIEW_TOLERANCE_MM) -> list[dict]:
    """Per breast (R, L): its views, finding counts, the most suspicious finding and the lesions seen in both views.

    ``images``: dicts with ``laterality``, ``view`` and ``index``; ``findings``: dicts with ``image`` (index),
    ``kind``, ``nipple_distance_mm`` and a ``suspicion`` in [0, 1] (built-in clusters: see the caller; a
    detector's findings: its score).  Marks each finding ``seen_in_both_views`` and ``other_view_finding`` (its
    partner's index in ``findings``) in place; ``tolerance_mm``: as in :func:`cross_view_pairs`.
    """
    by_image = {im["index"]: im for im in images}
    out = []
    for lat in ("R", "L"):
        views = [im for im in images if im["laterality"] == lat]
        if not views:
            continue
        mine = [f for f in findings if by_image[f["image"]]["laterality"] == lat]
        for kind in sorted({f["kind"] for f in mine}):
            cc = [f for f in mine if f["kind"] == kind and by_image[f["image"]]["view"] in CC_VIEWS]
            ob = [f for f in mine if f["kind"] == kind and by_image[f["image"]]["view"] in OBLIQUE_VIEWS]
            for f in cc + ob:
                f.setdefault("seen_in_both_views", False)
            for i, j in cross_view_pairs(cc, ob, tolerance_mm=tolerance_mm):
                cc[i]["seen_in_both_views"] = ob[j]["seen_in_both_views"] = True
                cc[i]["other_view_finding"], ob[j]["other_view_finding"] = ob[j]["index"], cc[i]["index"]
        top = max(mine, key=lambda f: f.get("suspicion", 0.0), default=None)
        out.append({"laterality": lat, "views": sorted(im["view"] for im in views),
                    "n_findings": len(mine),
                    "n_seen_in_both_views": sum(1 for f in mine if f.get("seen_in_both_views")) // 2,
                    "highest_suspicion": None if top is None else round(float(top.get("suspicion", 0.0)), 4),
                    "highest_suspicion_finding": None if top is None else top["index"]})
    return out


def montage(images: list[dict], *, height: int = 600):
    """The exam on one picture, as a reader hangs it: R then L, CC above MLO, chest walls facing each other, each
    view's findings drawn (``findings`` list of ``(x_px, y_px, radius_px, colour)`` in canonical pixels).

    ``images``: dicts with ``laterality``, ``view``, ``pixels`` (canonical, brighter = denser) and ``marks``.
    """
    from PIL import Image, ImageDraw

    slots = {("R", 0): (0, 0), ("L", 0): (1, 0), ("R", 1): (0, 1), ("L", 1): (1, 1)}
    tiles: dict[tuple[int, int], Image.Image] = {}
    for im in images:
        row = 0 if im["view"] in CC_VIEWS else 1
        slot = slots.get((im["laterality"], row))
        if slot is None or slot in tiles:
            continue
        px = np.asarray(im["pixels"], dtype=np.float32)
        lo, hi = np.percentile(px, [1, 99.5])
        grey = np.clip((px - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
        pic = Image.fromarray(grey).convert("RGB")
        draw = ImageDraw.Draw(pic)
        for x, y, r, colour in im.get("marks", []):
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=max(2, int(r / 8)))
        scale = height / pic.height
        pic = pic.resize((max(1, round(pic.width * scale)), height))
        if im["laterality"] == "R":  # the right breast's chest wall faces the left breast's: mirror it
            pic = pic.transpose(Image.FLIP_LEFT_RIGHT)
        ImageDraw.Draw(pic).text((8, 8), f"{im['laterality']} {im['view']}", fill=(255, 255, 0))
        tiles[slot] = pic
    width = max((t.width for t in tiles.values()), default=height // 2)
    sheet = Image.new("RGB", (2 * width, 2 * height), (0, 0, 0))
    for (col, row), pic in tiles.items():
        x = width - pic.width if col == 0 else width  # right-breast pictures flush against the middle
        sheet.paste(pic, (x, row * height))
    return sheet


__all__ = ["CROSS_VIEW_TOLERANCE_MM", "breast_summaries", "cross_view_pairs", "montage", "nipple_distance_mm",
           "nipple_xy_px"]
