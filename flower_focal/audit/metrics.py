"""Scoring reconstructions against the true images: SSIM, PSNR and the leakage rule.

Images are compared in ``[0, 1]`` (the model input ``[-1, 1]`` mapped back) with MONAI's
:class:`~monai.metrics.SSIMMetric` (Gaussian window 11, sigma 1.5, data range 1) and
:class:`~monai.metrics.PSNRMetric` (max value 1). Institutions train on randomly flipped and
90-degree-rotated copies of their images (the project's training augmentation), so a
reconstruction is compared with each of the 8 flips/rotations of the true image and the best
is kept; in a batch, reconstructions are matched one-to-one to true images (Hungarian
assignment on that SSIM), because the attacker does not know their order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from flower_focal.audit.config import SSIM_THRESHOLD

RULE = (
    "a sample is counted as leaked when the attacker's reconstruction has SSIM >= {t} to the "
    "true image (MONAI SSIMMetric, Gaussian window 11, sigma 1.5, images in [0, 1]; best of the "
    "8 flips/90-degree rotations the training augmentation can apply; in a batch, "
    "reconstructions are matched one-to-one to the true images by the Hungarian assignment on "
    "SSIM) and higher SSIM than an uninformed guess, a flat image in the true image's mean "
    "colour (so near-uniform tiles that any flat image matches are not counted); leakage rate "
    "= leaked samples / attacked samples"
)


def rule_text(threshold: float = SSIM_THRESHOLD) -> str:
    """The leakage rule, in words, with ``threshold`` filled in."""
    return RULE.format(t=threshold)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model input space ``[-1, 1]`` -> image ``[0, 1]`` (clipped)."""
    return ((x.float().clamp(-1.0, 1.0) + 1.0) / 2.0).clamp(0.0, 1.0)


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/90-degree rotations of ``(..., H, W)`` images (identity first)."""
    out = []
    for flip in (False, True):
        base = torch.flip(x, dims=(-1,)) if flip else x
        out += [torch.rot90(base, k, dims=(-2, -1)) for k in range(4)]
    return out


def _ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from monai.metrics import SSIMMetric

    return SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")(a, b).reshape(-1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from monai.metrics import PSNRMetric

    return PSNRMetric(max_val=1.0, reduction="none")(a, b).reshape(-1)


@dataclass(frozen=True)
class BatchScore:
    """Per true image: SSIM and PSNR of its matched reconstruction, and which one."""

    ssim: list[float]
    psnr: list[float]
    matched: list[int]
    transform: list[int]
    baseline: list[float]


def score_batch(recon: torch.Tensor, truth: torch.Tensor) -> BatchScore:
    """Score reconstructions ``(B, C, H, W)`` against true images ``(B, C, H, W)`` in [0, 1]."""
    from scipy.optimize import linear_sum_assignment

    if recon.shape != truth.shape or recon.ndim != 4:
        raise ValueError(f"need equal (B, C, H, W) shapes, got {tuple(recon.shape)} and {tuple(truth.shape)}")
    b = recon.shape[0]
    variants = torch.stack(dihedral(recon.float()), dim=1)  # (B, 8, C, H, W)
    rec = variants[:, None].expand(b, b, 8, *recon.shape[1:]).reshape(-1, *recon.shape[1:])
    tru = truth.float()[None, :, None].expand(b, b, 8, *truth.shape[1:]).reshape(-1, *truth.shape[1:])
    ssim = _ssim(rec, tru).reshape(b, b, 8)  # [recon, truth, transform]
    best, which = ssim.max(dim=2)
    rows, cols = linear_sum_assignment(-best.numpy())
    s_out, p_out, m_out, t_out = [0.0] * b, [0.0] * b, [0] * b, [0] * b
    for r, c in zip(rows, cols, strict=True):
        k = int(which[r, c])
        aligned = variants[r, k][None]
        s_out[c] = float(best[r, c])
        p_out[c] = float(_psnr(aligned, truth[c][None].float())[0])
        m_out[c], t_out[c] = int(r), k
    return BatchScore(s_out, p_out, m_out, t_out, flat_baseline(truth))


def flat_baseline(truth: torch.Tensor) -> list[float]:
    """SSIM of a flat image in each true image's own mean colour: what no information gets."""
    flat = truth.float().mean(dim=(-2, -1), keepdim=True).expand_as(truth).contiguous()
    return [float(v) for v in _ssim(flat, truth.float())]


def _stats(values: list[float]) -> dict[str, float | None]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": None, "median": None, "min": None, "max": None, "q25": None, "q75": None}
    arr = np.asarray(finite)
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "min": float(arr.min()),
            "max": float(arr.max()), "q25": float(np.quantile(arr, 0.25)),
            "q75": float(np.quantile(arr, 0.75))}


def leakage_summary(ssim: list[float], psnr: list[float], threshold: float = SSIM_THRESHOLD,
                    baseline: list[float] | None = None) -> dict[str, object]:
    """Leakage rate under the rule, plus the SSIM and PSNR distributions.

    ``baseline``: per sample, the SSIM of the uninformed flat guess (:func:`flat_baseline`);
    a sample leaks only if its reconstruction beats it. ``ssim_only_leakage_rate`` counts
    SSIM >= threshold alone, for comparison.
    """
    base = baseline if baseline is not None else [-1.0] * len(ssim)
    if len(base) != len(ssim):
        raise ValueError("baseline must have one value per sample")
    leaked = sum(1 for s, b in zip(ssim, base, strict=True) if s >= threshold and s > b)
    plain = sum(1 for s in ssim if s >= threshold)
    return {
        "leakage_rate": leaked / len(ssim) if ssim else 0.0,
        "leaked": leaked,
        "attacked": len(ssim),
        "ssim_only_leakage_rate": plain / len(ssim) if ssim else 0.0,
        "flat_guess_ssim": [round(b, 4) for b in base] if baseline is not None else [],
        "ssim": [round(s, 4) for s in ssim],
        "psnr": [round(p, 3) if math.isfinite(p) else None for p in psnr],
        "ssim_summary": _stats(ssim),
        "psnr_summary": _stats(psnr),
    }
