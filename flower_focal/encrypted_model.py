"""An HE-FedAvg model as the server holds it: ciphertext, its public layout and its weights.

The server of an encrypted strategy never holds a plaintext model, so the final model of a run
is an :class:`EncryptedModel`: the encrypted weighted sum, the ``[C, W]`` pair that rescales
it, and the :class:`~flower_focal.flatten.ArrayLayout` (names, shapes, dtypes: the
architecture, public). It is saved as two files, ``<name>.he`` (ciphertext) and
``<name>.he.json`` (layout and weights), and turned back into arrays only where the secret key
lives. A FedBN run's layout leaves the normalisation layers out of the ciphertext
(:attr:`~flower_focal.flatten.ArrayLayout.local`); the model carries their plaintext values
(the public initial model's: they were never aggregated) in a third file,
``<name>.he.local.npz``, so that it still decrypts to a complete state dict::

    # ServerApp (any app): result = strategy.start(...)
    strategy.save_final_model(result, "final_model.he")
    # at an institution (or: flower-focal decrypt-model --model final_model.he --key keys/)
    state_dict = EncryptedModel.load("final_model.he").state_dict("keys/secret.ctx")

Nothing here needs a model registry: any network's arrays round-trip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from flower_focal import wire
from flower_focal.flatten import ArrayLayout

KIND = "he-fedavg"


def meta_path(path: str | Path) -> Path:
    """The JSON file that goes with an encrypted model file (``model.he`` -> ``model.he.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def local_path(path: str | Path) -> Path:
    """The plaintext local arrays that go with an encrypted model file (``model.he`` ->
    ``model.he.local.npz``; only for a layout with local arrays, e.g. FedBN's)."""
    path = Path(path)
    return path.with_name(path.name + ".local.npz")


@dataclass(frozen=True)
class EncryptedModel:
    """Ciphertext of ``sum_i (n_i / C) w_i`` plus what an institution needs to decrypt it."""

    ciphertext: bytes
    weights: tuple[float, float]  # [C, W]: multiply the decrypted sum by C / W
    layout: ArrayLayout
    local: ArrayRecord = field(default_factory=ArrayRecord)
    """Plaintext values of the layout's :attr:`~flower_focal.flatten.ArrayLayout.local` arrays
    (FedBN: the initial normalisation layers); empty for a layout without any."""

    def __post_init__(self) -> None:
        missing = [n for n in self.layout.local if n not in self.local]
        if missing:
            raise ValueError(f"encrypted model: the layout keeps {len(self.layout.local)} arrays out of the "
                             f"ciphertext but their plaintext values are missing: {missing[:5]}")

    @classmethod
    def from_record(cls, arrays: ArrayRecord, layout: ArrayLayout) -> EncryptedModel:
        """From the strategy's encrypted aggregate (``Result.arrays`` of an HE-FedAvg run;
        with local arrays in the layout, their plaintext values travel in the same record)."""
        if wire.HE_CIPHERTEXT not in arrays or wire.HE_WEIGHTS not in arrays:
            raise ValueError(f"not an encrypted aggregate: arrays {list(arrays.keys())}")
        norm, total = (float(x) for x in arrays[wire.HE_WEIGHTS].numpy())
        local = ArrayRecord({n: arrays[n] for n in layout.local if n in arrays})  # all of them: __post_init__
        return cls(bytes(arrays[wire.HE_CIPHERTEXT].data), (norm, total), layout, local)

    def to_record(self) -> ArrayRecord:
        """The encrypted aggregate as Flower sends it (ciphertext Array + ``[C, W]``, then the
        plaintext local arrays, if any)."""
        return ArrayRecord({
            wire.HE_CIPHERTEXT: wire.he_array(self.ciphertext),
            wire.HE_WEIGHTS: Array(np.array(self.weights, dtype=np.float64)),
            **{n: self.local[n] for n in self.layout.local},
        })

    def meta(self) -> dict[str, Any]:
        """The public facts written next to the ciphertext."""
        return {"kind": KIND, "weights": list(self.weights), "layout": self.layout.to_json()}

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (ciphertext), ``path.local.npz`` (plaintext local arrays, if the layout
        has any) and ``path.json`` (last) atomically; returns ``path``."""
        from flower_focal.history import write_json_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.ciphertext)
        tmp.replace(path)
        meta = self.meta()
        if self.layout.local:
            side = local_path(path)
            tmp = side.with_name(side.name + ".tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, **{n: self.local[n].numpy() for n in self.layout.local})
            tmp.replace(side)
            meta["local_file"] = side.name
        write_json_atomic(meta_path(path), meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EncryptedModel:
        """Read a model written by :meth:`save` (or a run directory's ``model.he``).

        Raises
        ------
        FileNotFoundError
            If the ciphertext or its ``.json`` is missing.
        ValueError
            If the ``.json`` describes something else (e.g. a FOCAL head).

        A file written before layouts had local arrays loads as a layout without any.
        """
        path = Path(path)
        for needed in (path, meta_path(path)):
            if not needed.is_file():
                raise FileNotFoundError(f"{needed} not found (an encrypted model is {path.name} plus "
                                        f"{meta_path(path).name})")
        meta = json.loads(meta_path(path).read_text())
        if meta.get("kind", KIND) != KIND:
            raise ValueError(f"{path} holds a {meta['kind']!r} model, not an HE-FedAvg model")
        layout = ArrayLayout.from_json(meta["layout"])
        local = ArrayRecord()
        if layout.local:
            side = local_path(path)
            if not side.is_file():
                raise FileNotFoundError(
                    f"{side} not found: {path.name}'s layout keeps {len(layout.local)} arrays (FedBN's "
                    f"normalisation layers) out of the ciphertext, and their plaintext values are in that file")
            with np.load(side, allow_pickle=False) as data:
                local = ArrayRecord({n: Array(np.array(data[n])) for n in layout.local if n in data.files})
        norm, total = (float(x) for x in meta["weights"])
        try:
            return cls(path.read_bytes(), (norm, total), layout, local)
        except ValueError as exc:  # the local arrays are not all there
            raise ValueError(f"{local_path(path)}: {exc}") from None

    def decrypt(self, secret: Any) -> ArrayRecord:
        """The plaintext model's arrays (names, shapes and dtypes of the layout; the local
        arrays' plaintext values merged in, in the model's order).

        ``secret`` is a :class:`~flower_focal.crypto.SecretContext`, a ``secret.ctx`` path or
        the keygen directory holding it.
        """
        from flower_focal.crypto import SECRET_FILE, SecretContext

        if not isinstance(secret, SecretContext):
            key = Path(secret)
            secret = SecretContext.load(key / SECRET_FILE if key.is_dir() else key)
        norm, total = self.weights
        if not (np.isfinite(norm) and np.isfinite(total) and norm > 0 and total > 0):
            raise ValueError(f"encrypted model carries invalid weights [C, W] = [{norm}, {total}]")
        flat = secret.decrypt(self.ciphertext)
        flat *= norm / total
        return self.layout.merge(self.layout.unflatten(flat), self.local)

    def state_dict(self, secret: Any) -> dict[str, Any]:
        """The plaintext model as a PyTorch ``state_dict`` (for ``model.load_state_dict``)."""
        return self.decrypt(secret).to_torch_state_dict()


FOCAL_KIND = "focal-head"


def save_focal_head(ciphertext: bytes, layout: Any, path: str | Path, *, moments: bytes | None = None,
                    stats_n: int = 0) -> Path:
    """Write FOCAL's encrypted head (``path`` + ``path.json`` with its FocalLayout).

    ``moments``: the encrypted global feature moments of a standardised run (``path.moments``,
    with ``stats_n`` in the JSON); whoever decrypts folds the standardisation into the head."""
    import dataclasses

    from flower_focal.history import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(ciphertext))
    tmp.replace(path)
    meta: dict[str, Any] = {"kind": FOCAL_KIND, "focal_layout": dataclasses.asdict(layout)}
    if moments is not None:
        side = path.with_name(path.name + ".moments")
        tmp = side.with_name(side.name + ".tmp")
        tmp.write_bytes(bytes(moments))
        tmp.replace(side)
        meta["moments_file"], meta["stats_n"] = side.name, int(stats_n)
    write_json_atomic(meta_path(path), meta)
    return path


def decrypt_focal_head(path: str | Path, secret: Any) -> dict[str, Any]:
    """FOCAL's final head as the state dict of ``nn.Linear(d, K)`` (``weight`` K x d, ``bias`` K)."""
    import torch

    head = decrypt_focal_matrix(path, secret)
    return {"weight": torch.tensor(head[:-1].T.copy(), dtype=torch.float32),
            "bias": torch.tensor(head[-1].copy(), dtype=torch.float32)}


def decrypt_focal_matrix(path: str | Path, secret: Any) -> np.ndarray:
    """FOCAL's final head ``(d + 1, K)`` (bias row last) for raw embeddings: a standardised
    run's head with the global mean / std (decrypted from ``path.moments``) folded in."""
    from flower_focal.crypto import SECRET_FILE, CkksKeyHolder, SecretContext
    from flower_focal.focal import FocalLayout, decrypt_head, feature_standardization, fold_standardization

    path = Path(path)
    meta = json.loads(meta_path(path).read_text())
    if meta.get("kind") != FOCAL_KIND:
        raise ValueError(f"{path} is not a FOCAL head")
    if not isinstance(secret, SecretContext):
        key = Path(secret)
        secret = SecretContext.load(key / SECRET_FILE if key.is_dir() else key)
    layout = FocalLayout(**meta["focal_layout"])
    holder = CkksKeyHolder(secret)
    head = decrypt_head(holder, layout, path.read_bytes())  # (d + 1, K), bias last
    if meta.get("moments_file"):  # trained on standardised features: fold mean / std in
        moments = (path.parent / meta["moments_file"]).read_bytes()
        head = fold_standardization(head, *feature_standardization(holder, layout, moments,
                                                                   int(meta["stats_n"])))
    return head


def decrypt_file(path: str | Path, secret: Any) -> dict[str, Any]:
    """Any encrypted model file (HE-FedAvg model or FOCAL head) as a PyTorch state dict."""
    if not meta_path(path).is_file():
        raise FileNotFoundError(f"{meta_path(path)} not found (it goes with {path})")
    kind = json.loads(meta_path(path).read_text()).get("kind", KIND)
    if kind == FOCAL_KIND:
        return decrypt_focal_head(path, secret)
    return EncryptedModel.load(path).state_dict(secret)
