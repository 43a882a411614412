"""Segmentation quality metrics on uint8/bool masks."""

from __future__ import annotations

import numpy as np


def dice(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """Dice coefficient of the foreground (class 1) of two masks of the same shape (any rank).

    Dice = 2 |P & T| / (|P| + |T|), in [0, 1]; two empty masks score 1.0. The
    masks are compared as `mask == 1`, so other class ids count as background.
    """
    pred = np.asarray(pred_mask)
    true = np.asarray(true_mask)
    if pred.shape != true.shape:
        raise ValueError(f"dice: mask shapes differ: {pred.shape} vs {true.shape}")
    p = pred == 1
    t = true == 1
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def mean_dice(pred_masks: np.ndarray, true_masks: np.ndarray) -> float:
    """Mean of per-image Dice over a batch (N, H, W) of masks."""
    if len(pred_masks) != len(true_masks):
        raise ValueError(f"mean_dice: {len(pred_masks)} predictions vs {len(true_masks)} masks")
    return float(np.mean([dice(p, t) for p, t in zip(pred_masks, true_masks, strict=True)]))
