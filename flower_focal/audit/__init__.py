"""Privacy audit: gradient-inversion attacks on exactly what the server observes.

    from flower_focal.audit import AuditConfig, run_audit
    result = run_audit(AuditConfig(strategy="fedavg", dataset="pathmnist", model="lenet-sigmoid",
                                   batch_size=1, num_samples=8), out_dir="audit-out")
    result["leakage_rate"]   # share of attacked images reconstructed with SSIM >= 0.6

Modules: :mod:`.attacks` (gradient estimate, iDLG labels, L-BFGS gradient matching),
:mod:`.metrics` (MONAI SSIM/PSNR, the leakage rule), :mod:`.federation` (one real round with the
library's ClientApp handlers, recording the server's view), :mod:`.harness` (per-strategy audit,
JSON + PNG), :mod:`.config` (:class:`AuditConfig`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flower_focal.audit.config import SSIM_THRESHOLD, AuditConfig

if TYPE_CHECKING:
    from flower_focal.audit.harness import run_audit
    from flower_focal.audit.metrics import rule_text

__all__ = ["SSIM_THRESHOLD", "AuditConfig", "rule_text", "run_audit"]


def __getattr__(name: str) -> Any:  # torch, Flower and MONAI load on first use only
    if name == "run_audit":
        from flower_focal.audit.harness import run_audit

        return run_audit
    if name == "rule_text":
        from flower_focal.audit.metrics import rule_text

        return rule_text
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
