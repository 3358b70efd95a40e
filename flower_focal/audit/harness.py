"""The privacy audit: attack exactly what the server observes under each strategy.

:func:`run_audit` runs one real federated round (:mod:`.federation`) whose attacked
institutions each hold one batch, then plays the honest-but-curious server:

* ``fedavg``: the server holds each institution's plaintext reply. Its gradient estimate is
  ``(w_global - w_returned) / (lr * local_steps)``; labels come from iDLG's rule and the
  images from gradient matching (:mod:`.attacks`). With the DP option (Flower's
  ``DifferentialPrivacyClientSideFixedClipping``) the server still observes each clipped
  update *before* it adds the noise; the noised view (what the released model carries) is
  attacked as well and reported under ``dp``.
* ``he-fedavg`` / ``focal``: every Array of every reply is a ciphertext envelope. The audit
  shows that no attack can be set up (no float tensor of the model's shapes exists; Flower
  refuses to read the Arrays as numbers; no decryptor can be made from the server's public
  context) and reports leakage 0 to the server. Institution side, reported separately:
  he-fedavg - a curious institution decrypts the aggregate, subtracts its own update and
  attacks what is left (the other ``aggregate_size`` institutions' combined update); focal -
  an institution sees only its own logits and the decrypted linear head, so no image-space
  gradient inversion exists (reported as not applicable, with the reason).

Every result follows :func:`~flower_focal.audit.metrics.rule_text`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from flower_focal import wire
from flower_focal.audit import attacks, federation, metrics
from flower_focal.strategy.specs import strategy_spec
from flower_focal.audit.config import REAL_SETS, AuditConfig, default_real_data
from flower_focal.config import RunConfig
from flower_focal.testing.grid import LoopbackGrid

GRADIENT_ESTIMATE = (
    "g = (w_global - w_returned) / (lr * local_steps) for every trainable parameter "
    "(BatchNorm buffers ignored); exact for one plain SGD step, the mean update direction "
    "for several"
)
LABEL_RULE = (
    "iDLG: batch size 1 -> argmin_k sum_j dL/dW_kj of the last linear layer; larger batches -> "
    "classes with negative bias gradient, remaining labels by largest share of -dL/db"
)


@dataclass
class _Attacked:
    """Observed updates to invert, with what scoring needs."""

    gradients: list[dict[str, torch.Tensor]]
    labels: list[torch.Tensor]
    truths: list[torch.Tensor]
    true_labels: list[list[int]]


# ------------------------------------------------------------------------------ data
def _source_config(cfg: AuditConfig) -> tuple[RunConfig, dict[str, Any]]:
    """The RunConfig that reads the audit's image source, and a description of the source."""
    base = {"image_size": cfg.image_size, "seed": cfg.seed, "num_samples": cfg.num_samples_source}
    name = cfg.dataset
    if name in REAL_SETS:
        if cfg.data_path:
            path = Path(cfg.data_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"data_path {path} does not exist")
        else:
            path = default_real_data(name)
        if path is not None:
            info = {"dataset": name, "source": "real", "path": str(path.resolve())}
            return RunConfig(dataset="medmnist", data_path=str(path.resolve()), **base), info
        info = {"dataset": REAL_SETS[name], "source": "synthetic",
                "note": f"real {name} not found (../shared/data/{name}/{name}.npz); used the "
                        f"synthetic stand-in {REAL_SETS[name]}"}
        return RunConfig(dataset=REAL_SETS[name], **base), info
    if name in ("synthetic-retina", "synthetic-pathology"):
        return RunConfig(dataset=name, **base), {"dataset": name, "source": "synthetic"}
    if name in ("medmnist", "folder", "csv"):
        if not cfg.data_path:
            raise ValueError(f"dataset {name!r} needs data_path")
        path = Path(cfg.data_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data_path {path} does not exist")
        info = {"dataset": name, "source": "real", "path": str(path.resolve())}
        return RunConfig(dataset=name, data_path=str(path.resolve()), **base), info
    raise ValueError(
        f"Unknown dataset {name!r}; expected pathmnist, retinamnist, medmnist, folder, csv, "
        "synthetic-retina or synthetic-pathology"
    )


def _federation_config(cfg: AuditConfig, npz: Path, num_institutions: int, run_dir: Path,
                       **extra: Any) -> RunConfig:
    """One round, every institution trains, each holds exactly one batch (iid partition)."""
    return RunConfig(
        strategy=cfg.strategy, num_server_rounds=1, fraction_train=1.0, fraction_evaluate=1.0,
        min_available_nodes=num_institutions, min_train_replies=1,
        local_epochs=cfg.local_steps, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0,
        batch_size=cfg.batch_size, optimizer=cfg.optimizer,
        dataset="medmnist", data_path=str(npz), image_size=cfg.image_size, partitioner="iid",
        min_partition_size=1, model=cfg.model, seed=cfg.seed, run_dir=str(run_dir),
        device=cfg.device, **extra,
    )


# ------------------------------------------------------------------------------ attack
def _global_model(grid: LoopbackGrid, partition_id: int, cfg: AuditConfig):
    """The plaintext global model the server sent to ``partition_id`` (round 1)."""
    from flower_focal.models import arrays_into_model, build_model

    msg = grid.sent_to(partition_id, "train")[0]
    config = msg.content[wire.CONFIG]
    model = build_model(cfg.model, int(config[wire.IN_CHANNELS]), int(config[wire.NUM_CLASSES]),
                        cfg.image_size)
    arrays_into_model(model, msg.content[wire.ARRAYS])
    return model, msg.content[wire.ARRAYS]


def _state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in arrays.to_torch_state_dict().items()}


def _gradient(model: torch.nn.Module, global_arrays: ArrayRecord, returned: dict[str, torch.Tensor],
              cfg: AuditConfig) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    return attacks.estimate_gradient(_state(global_arrays), returned, names, lr=cfg.lr,
                                     local_steps=cfg.local_steps)


def _run_attack(model: torch.nn.Module, target: _Attacked, cfg: AuditConfig) -> dict[str, Any]:
    """Invert every observed gradient, score against the truth; keep images for the figure."""
    start = time.time()
    weight, bias = attacks.last_linear(model)
    shape = tuple(target.truths[0].shape[1:])
    recon: list[torch.Tensor | None] = [None] * len(target.gradients)
    by_size: dict[int, list[int]] = {}
    for i, t in enumerate(target.truths):
        by_size.setdefault(int(t.shape[0]), []).append(i)
    recovered = [attacks.recover_labels(g, weight, bias, int(t.shape[0]))
                 for g, t in zip(target.gradients, target.truths, strict=True)]
    evals = 0
    for size, idx in by_size.items():
        out = attacks.invert(
            model, [target.gradients[i] for i in idx], torch.stack([recovered[i] for i in idx]),
            shape, attack=cfg.attack, iterations=cfg.iterations, tv_weight=cfg.tv_weight,
            scale_free=cfg.dp_clip_norm > 0, seed=cfg.seed,
        )
        evals = max(evals, out.evaluations)
        for j, i in enumerate(idx):
            recon[i] = out.images[j]
    ssim, psnr, baseline, shown, correct, total = [], [], [], [], 0, 0
    for rec, truth, rec_labels, true_labels in zip(recon, target.truths, recovered,
                                                   target.true_labels, strict=True):
        assert rec is not None
        score = metrics.score_batch(metrics.to_unit(rec), metrics.to_unit(truth))
        ssim += score.ssim
        psnr += score.psnr
        baseline += score.baseline
        for c in range(truth.shape[0]):
            aligned = metrics.dihedral(metrics.to_unit(rec[score.matched[c]]))[score.transform[c]]
            leaked = score.ssim[c] >= cfg.ssim_threshold and score.ssim[c] > score.baseline[c]
            shown.append((metrics.to_unit(truth[c]), aligned, (score.ssim[c], leaked)))
        rec_list, true_list = sorted(rec_labels.tolist()), sorted(true_labels)
        correct += sum(min(rec_list.count(k), true_list.count(k)) for k in set(true_list))
        total += len(true_list)
    summary = metrics.leakage_summary(ssim, psnr, cfg.ssim_threshold, baseline)
    summary["label_accuracy"] = correct / total if total else None
    summary["lbfgs_evaluations"] = evals
    summary["attack_s"] = round(time.time() - start, 2)
    summary["_shown"] = shown
    return summary


def _attack_settings(cfg: AuditConfig) -> dict[str, Any]:
    objective = ("1 - cos(g(x'), g) + tv_weight * TV(x') (Inverting Gradients)"
                 if cfg.attack == "inverting-gradients" else
                 "||g(x') - g||^2 / ||g||^2 (DLG/iDLG)"
                 + ("; scale-free (optimal scale) because updates are clipped" if cfg.dp_clip_norm > 0 else ""))
    return {
        "attack": cfg.attack, "objective": objective, "optimizer": "L-BFGS (per update, batched)",
        "iterations": cfg.iterations, "tv_weight": cfg.tv_weight if cfg.attack == "inverting-gradients" else None,
        "init": "mid-grey + uniform noise of amplitude 0.3 (seeded)", "labels": LABEL_RULE,
        "attacker_knows": "the global model it sent, the architecture, lr, local steps, batch size, "
                          "the DP settings (all part of the run config)",
    }


# ------------------------------------------------------------------------------ strategies
def _audit_fedavg(cfg: AuditConfig, src: RunConfig, work: Path) -> dict[str, Any]:
    from flwr.supercore.differential_privacy import compute_stdv

    extra: dict[str, Any] = {}
    if cfg.dp_clip_norm > 0 and cfg.dp_noise_multiplier <= 0:
        raise ValueError(
            "fedavg's DP option is Flower's client-side fixed clipping with server noise: "
            "set dp_noise_multiplier > 0 together with dp_clip_norm"
        )
    if cfg.dp_noise_multiplier > 0:
        extra = {"dp_noise_multiplier": cfg.dp_noise_multiplier, "dp_clipping_norm": cfg.dp_clip_norm}
    n_inst = cfg.num_institutions
    data = federation.write_audit_npz(src, work / "data" / "audit.npz", n_inst * cfg.batch_size, cfg.seed)
    rc = _federation_config(cfg, data.npz, n_inst, work / "run", **extra)
    t0 = time.time()
    grid, _ = federation.run_round(rc, n_inst)
    federation_s = time.time() - t0
    replies = grid.replies("train")
    errors = {p: r.error.reason for p, r in replies.items() if r.has_error()}
    if errors:
        raise RuntimeError(f"institutions failed to train: {errors}")
    model, global_arrays = _global_model(grid, 0, cfg)
    target = _Attacked([], [], [], [])
    norms = []
    for p in range(n_inst):
        returned = _state(replies[p].content[wire.ARRAYS])
        target.gradients.append(_gradient(model, global_arrays, returned, cfg))
        target.truths.append(federation.institution_truth(rc, p, n_inst))
        target.true_labels.append(federation.partition_labels(rc, p, n_inst))
        g = _state(global_arrays)
        norms.append(float(torch.sqrt(sum(((g[k].double() - returned[k].double()) ** 2).sum()
                                          for k in returned))))
    result = _run_attack(model, target, cfg)
    result.update(
        attackable=True,
        reason="the server receives each institution's trained model in plaintext (Array stype "
               "numpy.ndarray) and knows the global model it sent",
        observed={"message_type": "train", "replies": len(replies),
                  "arrays": federation.array_summary([replies[0]]),
                  "update_l2_norms": [round(v, 6) for v in norms]},
        gradient_estimate=GRADIENT_ESTIMATE,
        institution_side=None,
        federation_s=round(federation_s, 2),
    )
    if cfg.dp_noise_multiplier > 0:
        std = compute_stdv(cfg.dp_noise_multiplier, cfg.dp_clip_norm, 1)
        rng = np.random.default_rng(cfg.seed + 99991)
        noised = _Attacked([], [], target.truths, target.true_labels)
        for p in range(n_inst):
            returned = _state(replies[p].content[wire.ARRAYS])
            returned = {k: v + torch.as_tensor(rng.normal(0.0, std, tuple(v.shape)), dtype=v.dtype)
                        if v.is_floating_point() else v for k, v in returned.items()}
            noised.gradients.append(_gradient(model, global_arrays, returned, cfg))
        after = _run_attack(model, noised, cfg)
        result["dp"] = {
            "mechanism": "Flower DifferentialPrivacyClientSideFixedClipping: institutions clip their "
                         "update to clip_norm (fixedclipping_mod); the server adds N(0, (z * clip_norm "
                         "/ m)^2) to the aggregate of the m sampled institutions",
            "clip_norm": cfg.dp_clip_norm, "noise_multiplier": cfg.dp_noise_multiplier,
            "server_observes": "each clipped update without noise (the server adds the noise "
                               "itself): the headline leakage_rate is measured on that",
            "after_noise": {
                "what": "the update as it leaves the server's DP wrapper for one sampled "
                        "institution (m = 1): clipped update + N(0, (z * clip_norm)^2) per "
                        "parameter; what anyone seeing the released model could attack",
                "noise_std": std,
                **_public(after),
            },
            "_after_shown": after["_shown"],
        }
    return result


def _ciphertext_checks(replies: list, public_bytes: bytes, param_shapes: set[tuple[int, ...]],
                       focal: bool = False) -> tuple[list[dict[str, str]], bool]:
    """Try to set up an attack on the server's view; return the attempts and whether any worked."""
    from flower_focal.crypto import CkksKeyHolder, PublicContext, SecretContext

    checks: list[dict[str, str]] = []
    arrays = [(n, a) for r in replies if not r.has_error()
              for rec in r.content.array_records.values() for n, a in rec.items()]
    plain = [(n, a) for n, a in arrays if a.stype != wire.HE_STYPE]
    shaped = [n for n, a in plain if tuple(a.shape) in param_shapes]
    checks.append({
        "check": "float tensors of the model's parameter shapes in the replies",
        "outcome": f"{len(shaped)} found; {len(arrays)} Arrays in {len(replies)} replies, "
                   f"{len(arrays) - len(plain)} of them stype {wire.HE_STYPE!r} (ciphertext bytes), "
                   f"{len(plain)} plaintext",
    })
    readable = 0
    if arrays:
        try:
            arrays[0][1].numpy()
            readable = 1
            checks.append({"check": "read a reply Array as numbers (Array.numpy())",
                           "outcome": "succeeded"})
        except (TypeError, ValueError) as exc:
            checks.append({"check": "read a reply Array as numbers (Array.numpy())",
                           "outcome": f"{type(exc).__name__}: {exc}"})
    public = PublicContext.from_bytes(public_bytes)
    checks.append({"check": "the server's context has a decrypt method",
                   "outcome": str(hasattr(public, "decrypt"))})
    try:
        SecretContext.from_bytes(public_bytes, source="the server's public.ctx")
        decryptor = True
        outcome = "a decryptor was built (the server holds the secret key!)"
    except ValueError as exc:
        decryptor = False
        outcome = f"ValueError: {exc}"
    checks.append({"check": "build a decrypting context from the server's public.ctx",
                   "outcome": outcome})
    if focal:
        try:
            CkksKeyHolder(public)  # type: ignore[arg-type]
            decryptor = True
            outcome = "a key holder was built"
        except ValueError as exc:
            outcome = f"ValueError: {exc}"
        checks.append({"check": "build FOCAL's decrypting CkksKeyHolder from the server's context",
                       "outcome": outcome})
    return checks, bool(shaped) or bool(readable) or decryptor


def _server_block(checks: list[dict[str, str]], broken: bool, cfg: AuditConfig,
                  what: str) -> dict[str, Any]:
    summary = metrics.leakage_summary([], [], cfg.ssim_threshold)
    summary.update(attackable=broken, checks=checks, label_accuracy=None)
    summary["reason"] = (
        f"the server holds only {what}: no plaintext tensor of the model's shapes exists to "
        "derive a gradient from, Flower refuses to read the ciphertext Arrays as numbers, and no "
        "decryptor can be built from its public context (it has no secret key), so the attack "
        "has no objective to optimise; leakage to the server is 0"
        if not broken else "a check failed: the server could read plaintext (see checks)"
    )
    return summary


def _keys(cfg: AuditConfig, work: Path, preset: str) -> Path:
    from flower_focal.crypto import SECRET_FILE, keygen

    if cfg.he_key_dir:
        key_dir = Path(cfg.he_key_dir)
        if not (key_dir / SECRET_FILE).is_file():
            raise FileNotFoundError(
                f"he_key_dir {key_dir} has no {SECRET_FILE}: the audit plays the institutions and "
                "needs their key set (or leave he_key_dir empty for a temporary one)"
            )
        return key_dir
    return keygen(work / "keys", preset)


def _audit_he_fedavg(cfg: AuditConfig, src: RunConfig, work: Path) -> dict[str, Any]:
    from flower_focal.crypto import PUBLIC_FILE, SecretContext
    from flower_focal.flatten import ArrayLayout

    key_dir = _keys(cfg, work, cfg.he_preset or "compact")
    secret = SecretContext.load(key_dir)
    extra = {"he_key_dir": str(key_dir), "he_clip_norm": cfg.dp_clip_norm,
             "he_noise_multiplier": cfg.dp_noise_multiplier}
    victims = cfg.num_institutions
    m = cfg.aggregate_size
    groups = [min(m, victims - i) for i in range(0, victims, m)]
    all_replies, target = [], _Attacked([], [], [], [])
    model, used, federation_s = None, 0, 0.0
    for gi, m_g in enumerate(groups):
        n_inst = m_g + 1  # partition 0 is the curious institution, 1..m_g the victims
        data = federation.write_audit_npz(src, work / f"data{gi}" / "audit.npz",
                                          n_inst * cfg.batch_size, cfg.seed, start=used)
        used += n_inst * cfg.batch_size
        rc = _federation_config(cfg, data.npz, n_inst, work / f"run{gi}", **extra)
        t0 = time.time()
        grid, _ = federation.run_round(rc, n_inst)
        federation_s += time.time() - t0
        replies = grid.replies("train")
        errors = {p: r.error.reason for p, r in replies.items() if r.has_error()}
        if errors:
            raise RuntimeError(f"institutions failed to train: {errors}")
        all_replies += [replies[p] for p in sorted(replies)]
        model, global_arrays = _global_model(grid, 0, cfg)
        # --- the curious institution (partition 0): what it legitimately holds
        evaluate_msg = grid.sent_to(0, "evaluate")[0]  # the encrypted aggregate, as it receives it
        agg = evaluate_msg.content[wire.ARRAYS]
        layout = ArrayLayout.from_config(evaluate_msg.content[wire.CONFIG])
        total = secret.decrypt(agg[wire.HE_CIPHERTEXT].data)  # sum_i (n_i / C) w_i
        norm, weight = (float(x) for x in agg[wire.HE_WEIGHTS].numpy())
        own = secret.decrypt(replies[0].content[wire.ARRAYS][wire.HE_CIPHERTEXT].data)
        n_own = float(replies[0].content[wire.METRICS][wire.NUM_EXAMPLES])
        others = layout.unflatten((total - own) * (norm / (weight - n_own)))
        target.gradients.append(_gradient(model, global_arrays, _state(others), cfg))
        target.truths.append(torch.cat([federation.institution_truth(rc, p, n_inst)
                                        for p in range(1, n_inst)]))
        target.true_labels.append([y for p in range(1, n_inst)
                                   for y in federation.partition_labels(rc, p, n_inst)])
    assert model is not None
    shapes = {tuple(p.shape) for p in model.parameters()}
    checks, broken = _ciphertext_checks(all_replies, (key_dir / PUBLIC_FILE).read_bytes(), shapes)
    result = _server_block(checks, broken, cfg, "CKKS/BFV ciphertexts of each weighted update")
    result.update(observed={"message_type": "train", "replies": len(all_replies),
                            "arrays": federation.array_summary(all_replies[:1])},
                  federation_s=round(federation_s, 2))
    inst = _run_attack(model, target, cfg)
    inst.update(
        threat="institution",
        attackable=True,
        reason=("a curious institution holds the shared secret key: it decrypts the aggregate it "
                "receives (sum of (n_i / C) * w_i with the plaintext [C, W]), subtracts its own "
                "encrypted reply (it knows it) and attacks the remaining combined update of the "
                f"other institutions ({m} per aggregate, each with batch {cfg.batch_size}) as one "
                f"batch of {m * cfg.batch_size}"),
        victims_per_aggregate=groups,
        gradient_estimate=GRADIENT_ESTIMATE + " with w_returned = the other institutions' "
                                              "weighted mean model",
    )
    result["institution_side"] = inst
    if cfg.dp_noise_multiplier > 0 or cfg.dp_clip_norm > 0:
        result["dp"] = {
            "mechanism": "he-fedavg: each institution clips its update to clip_norm and adds "
                         "N(0, (z * clip_norm / sqrt(m))^2) (m = sampled institutions) before it "
                         "encrypts; the institution-side attack sees the noised sum",
            "clip_norm": cfg.dp_clip_norm, "noise_multiplier": cfg.dp_noise_multiplier,
        }
    return result


def _audit_focal(cfg: AuditConfig, src: RunConfig, work: Path) -> dict[str, Any]:
    from flower_focal.crypto import PUBLIC_FILE

    key_dir = _keys(cfg, work, "focal")
    n_inst = cfg.num_institutions
    data = federation.write_audit_npz(src, work / "data" / "audit.npz", n_inst * cfg.batch_size, cfg.seed)
    rc = _federation_config(
        cfg, data.npz, n_inst, work / "run", he_key_dir=str(key_dir), backbone=cfg.backbone,
        backbone_weights=cfg.backbone_weights, backbone_input_size=cfg.backbone_input_size,
        embedding_cache_dir=str(work / "embeddings"),
    )
    t0 = time.time()
    grid, _ = federation.run_round(rc, n_inst)
    federation_s = time.time() - t0
    replies = [r for r in grid.received
               if r.metadata.message_type in (wire.ACTION_EMBED, wire.ACTION_FOCAL)]
    errors = [r.error.reason for r in replies if r.has_error()]
    if errors:
        raise RuntimeError(f"institutions failed: {errors[:3]}")
    steps = grid.sent_to(0, wire.ACTION_FOCAL)
    config = (steps or grid.sent_to(0, wire.ACTION_EMBED))[0].content[wire.CONFIG]
    d, k = int(config.get(wire.FOCAL_N_FEATURES, 0)), int(config[wire.NUM_CLASSES])
    shapes = {(d + 1, k), (k, d), (d,), (k,)} if d else {(k,)}
    checks, broken = _ciphertext_checks(replies, (key_dir / PUBLIC_FILE).read_bytes(), shapes,
                                        focal=True)
    result = _server_block(checks, broken, cfg, "encrypted embeddings Enc([x, 1]), the encrypted "
                                                "head and encrypted errors")
    result.update(observed={"message_types": sorted({r.metadata.message_type for r in replies}),
                            "replies": len(replies), "arrays": federation.array_summary(replies[:1])},
                  federation_s=round(federation_s, 2))
    result["_originals"] = [metrics.to_unit(img) for p in range(n_inst)
                            for img in federation.institution_truth(rc, p, n_inst)]
    result["institution_side"] = {
        **metrics.leakage_summary([], [], cfg.ssim_threshold),
        "threat": "institution",
        "attackable": False,
        "applicable": False,
        "label_accuracy": None,
        "reason": (
            "not applicable: an institution decrypts only its own logits (computed from its own "
            "images) and the linear head W over frozen-backbone embeddings. No gradient with "
            "respect to any image-dependent trainable layer is ever shared, so there is no "
            "image-space gradient-inversion objective. What W reveals: W_{t+1} - W_t = "
            "-lr/N * sum over all N training samples of [x, 1]^T (c_y (p - onehot)), a sum of "
            "embedding-error outer products; an institution that subtracts its own term sees the "
            "others' sum, and if a single other sample contributed, that sample's embedding x "
            "exactly (rank one). Inverting a frozen foundation-model embedding back to an image "
            "is a different attack (feature inversion) that this audit does not measure."
        ),
    }
    return result


# ------------------------------------------------------------------------------ output
def _public(block: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if not k.startswith("_")}


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _figure(result: dict[str, Any], path: Path, max_columns: int = 16) -> None:
    """PNG grid: originals over reconstructions (best-aligned), SSIM under each one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, list]] = []  # (label, [(image, ssim)]) or (label, []) for a text row
    shown = result.get("_shown") or []
    inst = result.get("institution_side") or {}
    if shown:
        rows += [("original", [(t, None) for t, _, _ in shown]),
                 (f"{result['strategy']} server: reconstruction", [(r, s) for _, r, s in shown])]
    else:
        originals = result.get("_originals") or [t for t, _, _ in inst.get("_shown") or []]
        rows += [("original", [(t, None) for t in originals]),
                 (f"{result['strategy']} server: nothing to reconstruct (ciphertexts only, "
                  "no decryption key)", [])]
    after = (result.get("dp") or {}).get("_after_shown") or []
    if after:
        rows.append(("after DP noise: reconstruction", [(r, s) for _, r, s in after]))
    if inst.get("_shown"):
        rows += [("original", [(t, None) for t, _, _ in inst["_shown"]]),
                 ("institution side (decrypted aggregate minus own update): reconstruction",
                  [(r, s) for _, r, s in inst["_shown"]])]
    elif inst:
        rows.append(("institution side: not applicable (see reason in audit.json)", []))
    ncols = max([min(len(items), max_columns) for _, items in rows] + [6])
    height = 1.5 * len(rows) + 0.6
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.15 * ncols + 0.5, height), squeeze=False)
    # row labels may be wider than one panel: fixed margins instead of tight_layout
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.55 / height, bottom=0.2 / height,
                        hspace=0.45, wspace=0.08)
    for ax in axes.ravel():
        ax.axis("off")
    for ri, (label, items) in enumerate(rows):
        axes[ri][0].set_title(label, loc="left", fontsize=8, pad=4)
        for ci, (img, s) in enumerate(items[:max_columns]):
            ax = axes[ri][ci]
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(),
                      cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1)
            if s is not None:
                value, leaked = s
                ax.text(0.5, -0.04, f"SSIM {value:.2f}", transform=ax.transAxes, ha="center",
                        va="top", fontsize=6.5, color="red" if leaked else "black")
    title = (f"{result['strategy']} | {result['config']['model']} | batch {result['config']['batch_size']}"
             f" | server leakage {result['leakage_rate']:.0%}")
    if inst.get("attacked"):
        title += f" | institution side {inst['leakage_rate']:.0%}"
    fig.suptitle(title + f"   (red: leaked, SSIM >= {result['ssim_threshold']} and above a flat guess)",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_audit(cfg: AuditConfig, out_dir: Path | str | None = None) -> dict[str, Any]:
    """Run the audit ``cfg`` describes; write ``audit.json`` and ``audit.png`` into ``out_dir``.

    Returns the JSON object (also written): ``strategy``, ``threat`` (``"server"``),
    ``leakage_rate``, ``ssim_threshold``, ``rule``, per-sample ``ssim`` / ``psnr`` (empty
    when no attack could be set up), ``attackable``, ``reason``, ``institution_side``
    (same shape, or null), ``config``, ``wall_time_s`` and more (see the README).
    """
    start = time.time()
    src, data_info = _source_config(cfg)
    with tempfile.TemporaryDirectory(prefix="flower-focal-audit-") as tmp:
        work = Path(tmp)
        kind = strategy_spec(cfg.strategy).audit
        audits = {"plaintext": _audit_fedavg, "he-fedavg": _audit_he_fedavg, "focal": _audit_focal}
        if kind not in audits:
            raise ValueError(f"strategy {cfg.strategy!r}: no audit for kind {kind!r} ({', '.join(audits)})")
        body = audits[kind](cfg, src, work)
    head = {
        "strategy": cfg.strategy,
        "threat": "server",
        "rule": metrics.rule_text(cfg.ssim_threshold),
        "ssim_threshold": cfg.ssim_threshold,
    }
    result = {**head, **body}
    result.setdefault("dp", None)
    result["attack_settings"] = _attack_settings(cfg)
    result["data"] = {**data_info, "image_size": cfg.image_size,
                      "attacked_images": result.get("attacked", 0)
                      + ((result.get("institution_side") or {}).get("attacked") or 0)}
    result["config"] = cfg.to_dict()
    result["wall_time_s"] = round(time.time() - start, 2)
    result["load_avg"] = list(os.getloadavg())
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _figure(result, out / "audit.png")
    public = _clean(result)
    if out_dir is not None:
        (Path(out_dir) / "audit.json").write_text(json.dumps(public, indent=2) + "\n")
    return public
