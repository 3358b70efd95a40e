"""The final global model on disk: ``model.pt`` (state dict) + ``model.json`` (how to rebuild it).

Written by the run driver at the end of a run; read by ``flower-focal evaluate``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from torch import nn

from flower_focal import keys
from flower_focal.history import write_json_atomic
from flower_focal.models import arrays_into_model, build_model
from flower_focal.packing import ArrayLayout

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

    def build(self) -> nn.Module:
        """A freshly initialised network of this spec."""
        return build_model(self.model, self.in_channels, self.num_classes, self.image_size)


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
    path = run_dir / MODEL_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    save_spec(run_dir, spec)
    return path


def save_encrypted_model(run_dir: Path, arrays: ArrayRecord, layout: ArrayLayout, spec: ModelSpec) -> Path:
    """Write an HE strategy's encrypted final model (``model.he`` + ``model.he.json``).

    The server can write this: it is ciphertext plus public facts (layout, weights). Turn it
    into ``model.pt`` with :func:`decrypt_model` where the secret key lives.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ENCRYPTED_FILE
    tmp = path.with_suffix(".he.tmp")
    tmp.write_bytes(arrays[keys.HE_CIPHERTEXT].data)
    tmp.replace(path)
    norm, total = (float(x) for x in arrays[keys.HE_WEIGHTS].numpy())
    meta = {"weights": [norm, total], "layout": {"names": list(layout.names),
            "shapes": [list(s) for s in layout.shapes], "dtypes": list(layout.dtypes)}}
    write_json_atomic(run_dir / ENCRYPTED_META_FILE, meta)
    save_spec(run_dir, spec)
    return path


def decrypt_model(run_dir: str | Path, key_path: str | Path) -> Path:
    """Decrypt a run's ``model.he`` with the institutions' secret key into ``model.pt``.

    Raises
    ------
    FileNotFoundError
        If the run has no encrypted model or the key is missing.
    """
    from flower_focal.crypto import SecretContext

    run_dir = Path(run_dir)
    for name in (ENCRYPTED_FILE, ENCRYPTED_META_FILE, SPEC_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: not an HE run directory?")
    meta = json.loads((run_dir / ENCRYPTED_META_FILE).read_text())
    layout = ArrayLayout(
        names=tuple(meta["layout"]["names"]),
        shapes=tuple(tuple(s) for s in meta["layout"]["shapes"]),
        dtypes=tuple(meta["layout"]["dtypes"]),
    )
    norm, total = meta["weights"]
    he_secret = SecretContext.load(key_path)
    flat = he_secret.decrypt((run_dir / ENCRYPTED_FILE).read_bytes()) * (norm / total)
    spec = ModelSpec(**json.loads((run_dir / SPEC_FILE).read_text()))
    return save_model(run_dir, layout.unflatten(flat), spec)


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
