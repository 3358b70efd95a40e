"""FOCAL split training: a linear head trained by the server on encrypted embeddings.

Pure step functions (:mod:`.protocol`), the slot layout (:mod:`.packing`), a numpy twin of
the same algorithm (:mod:`.plaintext`) and an in-process driver (:mod:`.driver`). No Flower
imports; HE goes through :mod:`flower_focal.crypto` only.
"""

from __future__ import annotations

from flower_focal.focal.driver import (
    Institution,
    TrainResult,
    he_evaluator_factory,
    train_encrypted,
    train_plaintext,
)
from flower_focal.focal.packing import DEFAULT_BLOCK, FocalLayout
from flower_focal.focal.plaintext import PlainEvaluator, PlainKeyHolder
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
    "Institution",
    "PlainEvaluator",
    "PlainKeyHolder",
    "TrainResult",
    "balanced_class_weights",
    "decrypt_head",
    "decrypt_logits",
    "encrypt_embeddings",
    "he_evaluator_factory",
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
    "train_encrypted",
    "train_plaintext",
]
