"""The final global model on disk: ``model.pt`` (state dict) + ``model.json`` (how to rebuild it).

Written by the run driver at the end of a run; read by ``flower-focal evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from flower_focal import wire
from flower_focal.encrypted_model import EncryptedModel, decrypt_file
from flower_focal.history import write_json_atomic
from flower_focal.models import arrays_into_model, build_model
from flower_focal.flatten import ArrayLayout

MODEL_FILE = "model.pt"
SPEC_FILE = "model.json"
ENCRYPTED_FILE = "model.he"  # HE strategies: the encrypted final model (server side)
ENCRYPTED_META_FILE = "model.he.json"  # its layout and [C, W] weights


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network and feed it like training did."""

    model: str
    in_channels: int
    num_classes: int
    image_size: int
    dataset: str
    strategy: str
    seed: int
    rounds: int
    backbone: str = ""  # FOCAL: frozen backbone + linear head (model "focal-linear")
    backbone_weights: str = ""
    backbone_input_size: int = 0
    fedbn: bool = False
    """FedBN run: the normalisation layers below were never aggregated; in ``model.pt`` they
    hold the *initial* (untrained) values, each institution's own stay in its node state."""
    local_layers: tuple[str, ...] = ()
    """FedBN: the modules (BatchNorm, GroupNorm, LayerNorm) that stayed at the institutions."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_layers", tuple(self.local_layers))  # a list from JSON

    @property
    def untrained_norm(self) -> bool:
        """FedBN with normalisation layers: ``model.pt``'s are the initial ones (a model without
        any, e.g. ``lenet-sigmoid``, is fully trained even under FedBN)."""
        return self.fedbn and bool(self.local_layers)

    def with_local_layers(self, model: nn.Module | None = None) -> ModelSpec:
        """FedBN: this spec with ``local_layers`` filled from ``model`` (this spec's network;
        built when not given)."""
        if not self.fedbn or self.local_layers:
            return self
        from flower_focal.models import norm_layers

        return self.replace(local_layers=tuple(norm_layers(model if model is not None else self.build())))

    @property
    def norm_warning(self) -> str:
        """FedBN: what ``model.pt``'s normalisation layers are (empty for other runs)."""
        if not self.untrained_norm:
            return ""
        return (f"this is a FedBN run: the global model's {len(self.local_layers)} normalisation "
                "layer(s) were never aggregated and hold their initial (untrained) values; each "
                "institution's trained ones stay in its own node state, so this model is not what "
                "any institution uses (the run's federated metrics in metrics.json are)")

    def build(self) -> nn.Module:
        """A freshly initialised network of this spec."""
        if self.backbone:
            from flower_focal.models.focal_classifier import build_focal_classifier

            return build_focal_classifier(self.backbone, self.num_classes,
                                          weights_path=self.backbone_weights,
                                          input_size=self.backbone_input_size)
        return build_model(self.model, self.in_channels, self.num_classes, self.image_size)

    def replace(self, **changes: object) -> ModelSpec:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def save_spec(run_dir: Path, spec: ModelSpec) -> Path:
    """Write ``model.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / SPEC_FILE, asdict(spec))
    return run_dir / SPEC_FILE


def save_model(run_dir: Path, arrays: ArrayRecord, spec: ModelSpec) -> Path:
    """Write the model weights and spec into ``run_dir``; returns the weights path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model = spec.build()
    arrays_into_model(model, arrays)
    spec = spec.with_local_layers(model)
    path = run_dir / MODEL_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    save_spec(run_dir, spec)
    return path


def save_encrypted_model(run_dir: Path, arrays: ArrayRecord, layout: Any, spec: ModelSpec) -> Path:
    """Write an HE strategy's encrypted final model (``model.he`` + ``model.he.json``; FedBN
    under he-fedavg also ``model.he.local.npz``, the plaintext initial normalisation layers that
    were never in the ciphertext).

    The server can write this: it is ciphertext plus public facts (layout, weights, the initial
    values of the local arrays). Turn it
    into ``model.pt`` with :func:`decrypt_model` where the secret key lives. ``layout`` is an
    :class:`~flower_focal.flatten.ArrayLayout` (HE-FedAvg) or a
    :class:`~flower_focal.focal.FocalLayout` (FOCAL: ``arrays`` holds the encrypted head).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ENCRYPTED_FILE
    if not isinstance(layout, ArrayLayout):
        from flower_focal.focal import FocalLayout

        if not isinstance(layout, FocalLayout):
            raise ValueError(f"unknown layout type {type(layout).__name__}")
        from flower_focal.encrypted_model import save_focal_head

        moments = arrays[wire.FOCAL_MOMENTS].data if wire.FOCAL_MOMENTS in arrays else None
        stats_n = int(arrays[wire.FOCAL_STATS_N].numpy()[0]) if wire.FOCAL_STATS_N in arrays else 0
        save_focal_head(arrays[wire.FOCAL_HEAD].data, layout, path, moments=moments, stats_n=stats_n)
        save_spec(run_dir, spec)
        return path
    EncryptedModel.from_record(arrays, layout).save(path)
    save_spec(run_dir, spec)
    return path


def decrypt_model(run_dir: str | Path, key_path: str | Path) -> Path:
    """Decrypt a run's ``model.he`` with the institutions' secret key into ``model.pt``.

    Raises
    ------
    FileNotFoundError
        If the run has no encrypted model or the key is missing.
    """
    run_dir = Path(run_dir)
    for name in (ENCRYPTED_FILE, ENCRYPTED_META_FILE, SPEC_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: not an HE run directory?")
    meta = json.loads((run_dir / ENCRYPTED_META_FILE).read_text())
    if meta.get("kind") == "focal-head":
        return _decrypt_focal_head(run_dir, key_path, meta)
    arrays = EncryptedModel.load(run_dir / ENCRYPTED_FILE).decrypt(key_path)
    spec = ModelSpec(**json.loads((run_dir / SPEC_FILE).read_text()))
    return save_model(run_dir, arrays, spec)


def decrypt_model_file(model_path: str | Path, key_path: str | Path, out: str | Path) -> Path:
    """Decrypt any encrypted model file (``HEFedAvg``/``Focal.save_final_model``) into a state dict.

    Needs no model registry: ``out`` holds ``torch.save(state_dict)`` with the layout's
    names, for the app's own ``model.load_state_dict(torch.load(out))``.
    """
    state = decrypt_file(model_path, key_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    return out


def _decrypt_focal_head(run_dir: Path, key_path: str | Path, meta: dict[str, Any]) -> Path:
    """FOCAL: decrypt the head W and write backbone + head as ``model.pt``."""
    from flower_focal.encrypted_model import decrypt_focal_matrix

    head = decrypt_focal_matrix(run_dir / ENCRYPTED_FILE, key_path)
    spec = ModelSpec(**json.loads((run_dir / SPEC_FILE).read_text()))
    model = spec.build()
    model.set_head(head)  # type: ignore[operator]
    path = run_dir / MODEL_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return path


def load_model(run_dir: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Load the final model of a run directory.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` has no ``model.pt``/``model.json`` (the message says which).
    """
    run_dir = Path(run_dir)
    for name in (MODEL_FILE, SPEC_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{run_dir / name} not found: is {run_dir} the run directory of a finished run?"
            )
    spec = ModelSpec(**json.loads((run_dir / SPEC_FILE).read_text()))
    model = spec.build()
    model.load_state_dict(torch.load(run_dir / MODEL_FILE, map_location="cpu", weights_only=True))
    model.eval()
    return model, spec
