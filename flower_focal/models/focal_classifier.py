"""The model FOCAL produces: a frozen backbone followed by the linear head trained under HE.

This module owns :class:`FocalClassifier` (``images -> logits``), buildable from a
:class:`~flower_focal.artifacts.ModelSpec` with a ``backbone`` so that ``flower-focal
evaluate --run-dir`` loads a FOCAL run like any other. The head is the decrypted FOCAL head
``W`` ((d + 1) x K, bias row last); see :meth:`FocalClassifier.set_head`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flower_focal.models.backbones import Backbone, build_backbone


class FocalClassifier(nn.Module):
    """``head(backbone(preprocess(x)))``; the backbone stays frozen (eval mode, no grad)."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.preprocess = backbone.preprocess
        self.features = backbone.module
        for param in self.features.parameters():
            param.requires_grad_(False)
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features.eval()
        with torch.no_grad():
            z = self.features(self.preprocess(x)).float()
        return self.head(z)

    def set_head(self, head: np.ndarray) -> None:
        """Load a FOCAL head ``W`` of shape ``(d + 1, K)`` (bias row last).

        Raises
        ------
        ValueError
            For a head of another shape.
        """
        w = np.asarray(head, dtype=np.float64)
        d, k = self.head.in_features, self.head.out_features
        if w.shape != (d + 1, k):
            raise ValueError(f"FOCAL head has shape {w.shape}, expected {(d + 1, k)}")
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(w[:d].T, dtype=torch.float32))
            self.head.bias.copy_(torch.as_tensor(w[d], dtype=torch.float32))


def build_focal_classifier(
    backbone: str, num_classes: int, *, weights_path: str = "", input_size: int = 0
) -> FocalClassifier:
    """A :class:`FocalClassifier` on CPU with a zero-initialised head."""
    bb = build_backbone(backbone, weights_path=weights_path or None, device="cpu",
                        input_size=input_size or None)
    model = FocalClassifier(bb, num_classes)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    return model
