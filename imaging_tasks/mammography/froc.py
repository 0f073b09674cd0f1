"""Free-response ROC (FROC) of the calcification-cluster detector: sensitivity against false clusters per image.

Why a sweep without re-running detection: each candidate carries ``score``, the largest ``k_sigma`` at which
:func:`~.calcifications.detect_calcifications` still accepts it (nothing else in detection depends on
``k_sigma``), so candidates found once at a low threshold, filtered at ``score >= t`` and clustered again, are
exactly what detection at ``k_sigma = t`` would give.  One detection pass per image gives the whole curve.

Scoring (the usual CAD convention, stated so the numbers can be reproduced): a detected cluster is a true
positive when its centroid lies within ``match_mm`` (default 5 mm, about the radius of the 1 cm² cluster disc) of
a planted cluster's centre that no other detected cluster has claimed (closest pairs first); every other detected
cluster is a false positive.  Sensitivity = planted clusters found / planted clusters; FP rate = false clusters
/ images (every image counts, also those without a planted cluster).

Visible clusters: a phantom can plant a cluster whose members no observer could see (0.1 mm specks behind
dense tissue at a low dose).  The generator gives each calcification its ideal-observer SNR (``ideal_snr``,
:mod:`.synth`) and each cluster ``n_visible_members``, those at Rose's criterion (SNR >= 5).  With
``min_visible`` (the cluster rule's 3), clusters with fewer visible members are "don't care": finding one is
neither a true nor a false positive, missing it is not a miss.  Both sensitivities are reported.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from imaging_tasks.mammography.calcifications import CLUSTER_MIN_COUNT, CLUSTER_RADIUS_MM, cluster_calcifications

MATCH_MM = 5.0
FP_RATES = (0.25, 0.5, 1.0)  # false clusters per image at which sensitivity is reported


def match_clusters(detected: list[dict], planted: list[dict], *, match_mm: float = MATCH_MM,
                   dont_care: frozenset[int] = frozenset()) -> tuple[int, int]:
    """``(true positives, false positives)`` of one image: greedy one-to-one matching, closest pairs first.
    A detection matched to a planted cluster whose index is in ``dont_care`` counts as neither."""
    if not detected:
        return 0, 0
    if not planted:
        return 0, len(detected)
    d = np.array([[float(np.hypot(*(np.subtract(a["centre_xy_mm"], b["centre_xy_mm"])))) for b in planted]
                  for a in detected])
    used_d, used_p, tp, ignored = set(), set(), 0, 0
    for flat in np.argsort(d, axis=None):
        i, j = divmod(int(flat), len(planted))
        if d[i, j] > match_mm:
            break
        if i not in used_d and j not in used_p:
            used_d.add(i)
            used_p.add(j)
            if j in dont_care:
                ignored += 1
            else:
                tp += 1
    return tp, len(detected) - tp - ignored


def stored_grid_candidates(ds, *, k_sigma: float, device=None, **detect_options) -> list[dict]:
    """Candidates of one MG dataset as the exam step finds them (:func:`.study.prepare_image`,
    :func:`.study.detect_in_breast`), their centres moved to the stored grid, where the generator's truth is."""
    from imaging_tasks.mammography.study import detect_in_breast, prepare_image

    prep = prepare_image(ds)
    sp = prep.image.pixel_spacing_mm
    cands = detect_in_breast(prep, device=device, k_sigma=k_sigma, **detect_options)
    for c in cands:
        c["centre_xy_px"] = [float(v) for v in prep.image.to_stored_xy(c["centre_xy_px"])[0]]
        c["centre_xy_mm"] = [v * sp for v in c["centre_xy_px"]]
    return cands


def froc_curve(images: Iterable[tuple[list[dict], list[dict]]], thresholds: Iterable[float], *,
               match_mm: float = MATCH_MM, radius_mm: float = CLUSTER_RADIUS_MM,
               min_count: int = CLUSTER_MIN_COUNT, min_visible: int | None = None) -> list[dict]:
    """One point per threshold: ``{"threshold", "sensitivity", "fp_per_image", "tp", "fp", "planted",
    "dont_care", "images"}``.

    ``images``: per image, the candidates detected at a ``k_sigma`` at or below the lowest threshold, and the
    planted clusters (``centre_xy_mm``; with ``min_visible``, also ``n_visible_members``: see the module doc).
    """
    images = list(images)
    ignore = [frozenset(j for j, cl in enumerate(p) if min_visible is not None
                        and cl["n_visible_members"] < min_visible) for _, p in images]
    dont_care = sum(len(i) for i in ignore)
    planted = sum(len(p) for _, p in images) - dont_care
    curve = []
    for t in sorted(thresholds):
        tp = fp = 0
        for (cands, truth), skip in zip(images, ignore):
            kept = [c for c in cands if c["score"] >= t]
            found = cluster_calcifications(kept, radius_mm=radius_mm, min_count=min_count)
            a, b = match_clusters(found, truth, match_mm=match_mm, dont_care=skip)
            tp, fp = tp + a, fp + b
        curve.append({"threshold": float(t), "sensitivity": tp / planted if planted else float("nan"),
                      "fp_per_image": fp / len(images) if images else float("nan"), "tp": tp, "fp": fp,
                      "planted": planted, "dont_care": dont_care, "images": len(images)})
    return curve


def sensitivity_at(curve: list[dict], fp_per_image: float) -> float:
    """Highest sensitivity among the operating points with at most ``fp_per_image`` false clusters per image."""
    return max((p["sensitivity"] for p in curve if p["fp_per_image"] <= fp_per_image), default=0.0)


def operating_point(curve: list[dict], *, min_sensitivity: float = 0.9, max_fp_per_image: float = 0.5) -> dict | None:
    """The point to ship as the default: among those meeting both targets, the highest sensitivity (a screening
    aid misses as little as it can), then the fewest false clusters, then the lower threshold; None when no
    threshold meets them."""
    ok = [p for p in curve if p["sensitivity"] >= min_sensitivity and p["fp_per_image"] <= max_fp_per_image]
    return min(ok, key=lambda p: (-p["sensitivity"], p["fp_per_image"], p["threshold"])) if ok else None


__all__ = ["FP_RATES", "MATCH_MM", "froc_curve", "match_clusters", "operating_point", "sensitivity_at",
           "stored_grid_candidates"]
