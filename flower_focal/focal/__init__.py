"""FOCAL split training: a linear head trained by the server on encrypted embeddings.

Pure step functions (:mod:`.protocol`) and the slot layout (:mod:`.packing`). No Flower
imports; HE goes through :mod:`flower_focal.crypto` only. The numpy twin of the same algorithm
and the in-process driver (``train_encrypted``, ``train_plaintext``) are harness:
:mod:`flower_focal.testing`.
"""

from __future__ import annotations

import warnings
from typing import Any

from flower_focal.focal.packing import DEFAULT_BLOCK, FocalLayout
from flower_focal.focal.errors import FocalDiverged
from flower_focal.focal.protocol import (
    MOMENTUM,
    STEP_SCALE,
    ErrorUpload,
    FocalServer,
    LossGuard,
    balanced_class_weights,
    derived_step,
    encrypt_feature_moments,
    feature_standardization,
    fold_standardization,
    institution_loss,
    moment_count,
    server_restore,
    server_snapshot,
    server_sum,
    decrypt_head,
    decrypt_logits,
    encrypt_embeddings,
    init_head,
    institution_error,
    predict_logits,
    server_add_embeddings,
    server_add_validation,
    server_backward_update,
    server_export_head,
    server_forward,
    server_forward_validation,
    server_setup,
    softmax,
)

__all__ = [
    "DEFAULT_BLOCK",
    "MOMENTUM",
    "STEP_SCALE",
    "ErrorUpload",
    "FocalDiverged",
    "LossGuard",
    "derived_step",
    "encrypt_feature_moments",
    "feature_standardization",
    "fold_standardization",
    "institution_loss",
    "moment_count",
    "server_restore",
    "server_snapshot",
    "server_sum",
    "FocalLayout",
    "FocalServer",
    "balanced_class_weights",
    "decrypt_head",
    "decrypt_logits",
    "encrypt_embeddings",
    "init_head",
    "institution_error",
    "predict_logits",
    "server_add_embeddings",
    "server_add_validation",
    "server_backward_update",
    "server_export_head",
    "server_forward",
    "server_forward_validation",
    "server_setup",
    "softmax",
]


_MOVED = {  # old name here -> name in flower_focal.testing (deprecated aliases)
    "Institution": "InstitutionEmbeddings",
    "PlainEvaluator": "PlainEvaluator",
    "PlainKeyHolder": "PlainKeyHolder",
    "TrainResult": "TrainResult",
    "he_evaluator_factory": "he_evaluator_factory",
    "train_encrypted": "train_encrypted",
    "train_plaintext": "train_plaintext",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import flower_focal.testing as testing

        warnings.warn(f"flower_focal.focal.{name} moved to flower_focal.testing.{_MOVED[name]}",
                      DeprecationWarning, stacklevel=2)
        return getattr(testing, _MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
