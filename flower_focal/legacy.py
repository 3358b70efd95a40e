"""HE-FedAvg for Flower's legacy API: ``flwr.server.strategy`` strategies and ``NumPyClient``.

Many deployments still run the legacy API (a ``ServerApp(server_fn=...)`` with a
``flwr.server.strategy`` strategy, a ``ClientApp(client_fn=...)`` returning a ``NumPyClient``).
Two parts make HE-FedAvg work there without touching the app's own client or model:

* :class:`HEFedAvgLegacy`, a subclass of ``flwr.server.strategy.FedAvg`` whose server only adds
  ciphertexts (:class:`~flower_focal.crypto.Accumulator`) and never holds a secret key;
* :class:`HENumPyClient`, a ``NumPyClient`` that wraps the app's own: it decrypts the global
  model before the app's ``fit`` / ``evaluate`` see it and encrypts what ``fit`` returns.

A legacy ``FitRes`` carries ``num_examples`` only *after* training, so every round has two
exchanges, as :class:`~flower_focal.strategy.he_fedavg.HEFedAvg` does for apps without the
describe query: the wrapped client trains and keeps its prepared update in the node's
``context.state`` (it never leaves the institution), replying with its example count; the
server announces ``C = sum n_i`` in a seal ``fit`` call to the same clients, and each encrypts
``(n_i / C) w_i``. Institutions decrypt the sum and rescale by ``C / W``. The same checks as the
Message-API path apply (NaN/Inf, the preset's value range, clipping and noise when configured).

Legacy Parameters carry no names: arrays are named ``"0"``, ``"1"``, ... in order, and the
layout (shapes, dtypes) comes from the strategy's plaintext ``initial_parameters``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.client import NumPyClient
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.supercore import log

from flower_focal import wire
from flower_focal.client.he_mod import hold_update, prepare_update, seal_held_update, secret_context
from flower_focal.encrypted_model import EncryptedModel
from flower_focal.flatten import ArrayLayout

HE_LAYOUT = "he-layout"  # legacy config: the layout as one JSON string (legacy configs hold scalars)
HE_ENCRYPTED = "he-encrypted"  # legacy config: the parameters are [ciphertext, [C, W]]


def _layout_json(layout: ArrayLayout) -> str:
    return json.dumps({"names": list(layout.names), "shapes": [list(s) for s in layout.shapes],
                       "dtypes": list(layout.dtypes)})


def _layout_from_json(text: str) -> ArrayLayout:
    d = json.loads(text)
    return ArrayLayout(tuple(d["names"]), tuple(tuple(int(x) for x in s) for s in d["shapes"]),
                       tuple(d["dtypes"]))


def _record(layout: ArrayLayout, arrays: list[np.ndarray]) -> ArrayRecord:
    if len(arrays) != len(layout.names):
        raise ValueError(f"got {len(arrays)} arrays, the model has {len(layout.names)}")
    return ArrayRecord({n: Array(np.asarray(a)) for n, a in zip(layout.names, arrays, strict=True)})


class HENumPyClient(NumPyClient):
    """Wrap an app's ``NumPyClient`` so that it takes part in :class:`HEFedAvgLegacy` rounds.

    ``context`` is the one ``client_fn`` received (its node config may name ``he-secret-key``;
    otherwise the run config's ``he-key-dir`` is used). Messages without flower-focal's HE
    config go to the wrapped client untouched.
    """

    def __init__(self, client: NumPyClient, context: Context) -> None:
        self.client = client
        self.he_context = context

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return self.client.get_parameters(config)

    def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
        return self.client.get_properties(config)

    def _secret(self, config: dict[str, Any]):
        secret = secret_context(self.he_context)
        if secret.fingerprint.hex() != config[wire.HE_FINGERPRINT]:
            raise ValueError("this institution's HE key set differs from the server's (fingerprint "
                             f"{secret.fingerprint.hex()} != {config[wire.HE_FINGERPRINT]})")
        return secret

    def _plain(self, parameters: list[np.ndarray], config: dict[str, Any], secret, layout: ArrayLayout
               ) -> list[np.ndarray]:
        if not config.get(HE_ENCRYPTED):
            return parameters
        if len(parameters) != 2:
            raise ValueError("an encrypted global model is [ciphertext, [C, W]]")
        blob = np.ascontiguousarray(parameters[0], dtype=np.uint8).tobytes()
        norm, total = (float(x) for x in parameters[1])
        model = EncryptedModel(blob, (norm, total), layout).decrypt(secret)
        return [model[n].numpy() for n in layout.names]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):
        if wire.HE_FINGERPRINT not in config:
            return self.client.fit(parameters, config)
        secret = self._secret(config)
        layout = _layout_from_json(str(config[HE_LAYOUT]))
        if config.get(wire.HE_SEAL):
            encrypted, n_examples, _ = seal_held_update(self.he_context, config, secret)
            return [np.frombuffer(encrypted[wire.HE_CIPHERTEXT].data, dtype=np.uint8)], int(n_examples), {}
        plain = self._plain(parameters, config, secret, layout)
        trained, n_examples, metrics = self.client.fit(plain, config)
        flat = prepare_update(_record(layout, trained), secret, layout, reference=_record(layout, plain),
                              clip_norm=float(config.get(wire.HE_CLIP_NORM, 0.0)),
                              noise_std=float(config.get(wire.HE_NOISE_STD, 0.0)))
        hold_update(self.he_context, flat, n_examples, config)
        return [], n_examples, {**metrics, wire.HE_PENDING: 1}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]):
        if wire.HE_FINGERPRINT not in config:
            return self.client.evaluate(parameters, config)
        secret = self._secret(config)
        layout = _layout_from_json(str(config[HE_LAYOUT]))
        return self.client.evaluate(self._plain(parameters, config, secret, layout), config)


class HEFedAvgLegacy(LegacyFedAvg):
    """``flwr.server.strategy.FedAvg`` whose server only adds ciphertexts (see module doc).

    Parameters
    ----------
    he_public : PublicContext
        The server's key-less context (``public.ctx``); a context holding a secret key is refused.
    initial_parameters : Parameters
        The plaintext initial model (required: it fixes the layout institutions decrypt into).
    clip_norm, noise_multiplier : float
        As for :class:`~flower_focal.strategy.he_fedavg.HEFedAvg`.
    exchange_timeout : float
        Seconds to wait for the seal exchange of a round.
    save_path : str or Path, optional
        Write the encrypted global model there after every round (``path`` + ``path.json``); the
        legacy API has no end-of-run hook, so this is where the final model lands.
    **kwargs
        ``flwr.server.strategy.FedAvg`` arguments; ``evaluate_fn`` is refused (the server holds
        no plaintext model).
    """

    def __init__(self, *, he_public: Any, initial_parameters: Parameters, clip_norm: float = 0.0,
                 noise_multiplier: float = 0.0, exchange_timeout: float = 3600.0,
                 save_path: str | Path | None = None, **kwargs: Any) -> None:
        from flower_focal.crypto import PublicContext

        if not isinstance(he_public, PublicContext) or he_public.holds_secret_key:
            raise ValueError("HEFedAvgLegacy must be given a public context (no secret key): public.ctx")
        if kwargs.get("evaluate_fn") is not None:
            raise ValueError("HEFedAvgLegacy cannot run an evaluate_fn: the server only ever holds the "
                             "encrypted model. Use federated evaluation (the clients' evaluate).")
        if noise_multiplier > 0 and clip_norm <= 0:
            raise ValueError("noise_multiplier needs clip_norm > 0 (noise is calibrated to the clip)")
        super().__init__(initial_parameters=initial_parameters, **kwargs)
        arrays = parameters_to_ndarrays(initial_parameters)
        self.layout = ArrayLayout(tuple(str(i) for i in range(len(arrays))),
                                  tuple(tuple(int(d) for d in a.shape) for a in arrays),
                                  tuple(str(a.dtype) for a in arrays))
        self.he_public = he_public
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
        self.exchange_timeout = exchange_timeout
        self.final: EncryptedModel | None = None
        self.save_path = Path(save_path) if save_path else None

    @classmethod
    def from_key_dir(cls, key_dir: str | Path, **kwargs: Any) -> HEFedAvgLegacy:
        """The strategy with the server's ``public.ctx`` from ``key_dir`` (keygen output)."""
        from flower_focal.crypto import PublicContext

        return cls(he_public=PublicContext.from_key_dir(key_dir), **kwargs)

    def _he_config(self, config: dict[str, Any], encrypted: bool) -> dict[str, Any]:
        return {**config, wire.HE_FINGERPRINT: self.he_public.fingerprint.hex(),
                HE_LAYOUT: _layout_json(self.layout), HE_ENCRYPTED: encrypted,
                wire.HE_CLIP_NORM: float(self.clip_norm)}

    def configure_fit(self, server_round, parameters, client_manager):
        pairs = super().configure_fit(server_round, parameters, client_manager)
        encrypted = self.final is not None
        std = self.noise_multiplier * self.clip_norm / max(len(pairs), 1) ** 0.5
        for _, ins in pairs:  # Flower's FedAvg shares one FitIns among the clients
            ins.config = self._he_config({**ins.config, wire.SERVER_ROUND: server_round,
                                          wire.HE_NOISE_STD: std}, encrypted)
        return pairs

    def configure_evaluate(self, server_round, parameters, client_manager):
        pairs = super().configure_evaluate(server_round, parameters, client_manager)
        for _, ins in pairs:
            ins.config = self._he_config(dict(ins.config), self.final is not None)
        return pairs

    def aggregate_fit(self, server_round, results, failures):
        """Announce C to the institutions that trained, sum their ciphertexts (seal exchange).

        The legacy loop has no end-of-run hook, so a run cannot be checked when it ends: a round
        that aggregates nothing while no earlier round did raises
        :class:`~flower_focal.strategy.NothingAggregated` (naming the failures) instead of
        letting the run finish with the untrained initial model.
        """
        for failure in failures:
            log(WARNING, "he-fedavg (legacy) round %d: a client failed: %s", server_round, failure)
        params, metrics = self._aggregate_fit(server_round, results)
        if params is None and self.final is None:
            from flower_focal.strategy import NothingAggregated

            shown = "; ".join(str(f) for f in failures[:3]) or "no client replied with a pending update"
            raise NothingAggregated(f"he-fedavg (legacy): round {server_round} aggregated nothing and "
                                    f"no earlier round did, so nothing was trained. Failures: {shown}")
        return params, metrics

    def _aggregate_fit(self, server_round, results):
        from flower_focal.crypto import Accumulator, CiphertextError

        pending = [(proxy, res) for proxy, res in results if res.metrics.get(wire.HE_PENDING)]
        if not pending:
            return None, {}
        total = float(sum(res.num_examples for _, res in pending))
        seal = FitIns(Parameters(tensors=[], tensor_type=""), self._he_config(
            {wire.SERVER_ROUND: server_round, wire.HE_SEAL: True, wire.HE_WEIGHT_NORM: total},
            self.final is not None))
        with ThreadPoolExecutor(max_workers=len(pending)) as pool:
            futures = [pool.submit(proxy.fit, seal, self.exchange_timeout, server_round) for proxy, _ in pending]
            sealed = [f.result() for f in futures]
        acc, weight, used = Accumulator(self.he_public), 0.0, []
        for (proxy, res), reply in zip(pending, sealed, strict=True):
            try:
                arrays = parameters_to_ndarrays(reply.parameters)
                if len(arrays) != 1:
                    raise CiphertextError(f"expected one ciphertext array, got {len(arrays)}")
                acc.add(np.ascontiguousarray(arrays[0], dtype=np.uint8).tobytes())
            except (CiphertextError, ValueError) as exc:
                log(WARNING, "he-fedavg (legacy) round %d: rejected client %s: %s", server_round, proxy.cid, exc)
                continue
            weight += res.num_examples
            used.append(res)
        if not used:
            return None, {}
        blob = acc.to_bytes()
        self.final = EncryptedModel(blob, (total, weight), self.layout)
        if self.save_path is not None:
            self.final.save(self.save_path)
        log(INFO, "he-fedavg (legacy) round %d: summed %d ciphertexts (total weight %.0f)",
            server_round, len(used), weight)
        metrics: dict[str, Any] = {}
        if self.fit_metrics_aggregation_fn:
            metrics = self.fit_metrics_aggregation_fn(
                [(r.num_examples, {k: v for k, v in r.metrics.items() if k != wire.HE_PENDING}) for r in used])
        return ndarrays_to_parameters([np.frombuffer(blob, dtype=np.uint8),
                                       np.array([total, weight], dtype=np.float64)]), metrics

    def evaluate(self, server_round, parameters):
        """No server-side evaluation: the server holds only ciphertext."""
        return None

    def save_final_model(self, path: str | Path) -> Path:
        """Write the encrypted final model (``path`` + ``path.json``) for an institution to decrypt."""
        if self.final is None:
            raise RuntimeError("he-fedavg (legacy): no round aggregated, there is no model to save")
        return self.final.save(path)
