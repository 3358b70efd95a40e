"""What an institution does with each message: describe itself, train, evaluate.

Handlers are plain functions ``(Message, Context) -> Message`` so that the repository's
ClientApp, a consortium's own ClientApp and the tests all call the same code. Every handler
reads the run config through :class:`~flower_focal.config.RunConfig` and its data through
:func:`flower_focal.data.load_institution`; nothing here knows which strategy the server runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore import log

from flower_focal import wire
from flower_focal.config import RunConfig, check_personalisation

if TYPE_CHECKING:  # torch and MONAI are imported by the handlers that need them
    from flower_focal.data import InstitutionData


@dataclass(frozen=True)
class Site:
    """One institution as seen from inside its ClientApp."""

    cfg: RunConfig
    partition_id: int
    num_partitions: int
    data: InstitutionData


def site_from_context(context: Context) -> Site:
    """Resolve this institution's config and data from the run and node configs.

    Node config keys: ``partition-id`` / ``num-partitions`` (set by the simulation engine, or
    by hand to split one file among SuperNodes), ``data-path`` (this institution's own data;
    overrides the run config's ``data-path``) and ``device``.
    """
    from flower_focal.data import load_institution

    cfg = RunConfig.from_mapping(context.run_config, others="ignore")  # the app's keys are its own
    node = context.node_config
    if wire.NODE_DATA_PATH in node:
        cfg = cfg.replace(data_path=str(node[wire.NODE_DATA_PATH]))
    if wire.NODE_DEVICE in node:
        cfg = cfg.replace(device=str(node[wire.NODE_DEVICE]))
    partition_id = int(node.get(wire.NODE_PARTITION_ID, 0))
    num_partitions = int(node.get(wire.NODE_NUM_PARTITIONS, 1))
    data = load_institution(cfg, partition_id, num_partitions)
    return Site(cfg, partition_id, num_partitions, data)


def local_seed(seed: int, partition_id: int, server_round: int) -> int:
    """Seed of one institution's local work in one round (distinct, reproducible)."""
    return (seed * 1_000_003 + partition_id * 10_007 + server_round) % (2**31 - 1)


def _optimiser_settings(cfg: RunConfig, device) -> dict:
    """The ``train_local`` arguments every local training of an institution shares: its global
    model's, Ditto's personal model's and the evaluation's fine-tuned copy's."""
    return {"batch_size": cfg.batch_size, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
            "optimizer": cfg.optimizer, "device": device,
            "num_workers": None if cfg.num_workers < 0 else cfg.num_workers, "precision": cfg.precision}


def describe(message: Message, context: Context) -> Message:
    """Answer the server's describe query: partition id and data shape, no label statistics."""
    site = site_from_context(context)
    info = ConfigRecord(
        {
            wire.PARTITION_ID: site.partition_id,
            wire.NUM_CLASSES: site.data.num_classes,
            wire.IN_CHANNELS: site.data.in_channels,
            wire.NUM_TRAIN: site.data.n_train,
        }
    )
    return Message(RecordDict({wire.CONFIG: info}), reply_to=message)


def describe_handler(num_train: Callable[[Context], int]) -> Callable[[Message, Context], Message]:
    """A ``query.describe`` handler for *any* ClientApp (optional).

    Register it as ``app.query("describe")(describe_handler(lambda ctx: len(my_trainset)))``.
    The server then knows each institution's partition (node config ``partition-id``, else the
    node id) and training-set size before the first round: sampling and aggregation follow
    partition order (bit-reproducible runs) and HE-FedAvg needs no extra exchange per round.
    It reads nothing of the app's run config.
    """

    def describe(message: Message, context: Context) -> Message:
        partition = context.node_config.get(wire.NODE_PARTITION_ID, context.node_id)
        info = ConfigRecord({wire.PARTITION_ID: int(partition), wire.NUM_CLASSES: 0,
                             wire.IN_CHANNELS: 0, wire.NUM_TRAIN: int(num_train(context))})
        return Message(RecordDict({wire.CONFIG: info}), reply_to=message)

    return describe


def _global_model(site: Site, message: Message):
    from flower_focal.models import arrays_into_model, build_model

    config = message.content[wire.CONFIG]
    model = build_model(
        site.cfg.model,
        int(config[wire.IN_CHANNELS]),
        int(config[wire.NUM_CLASSES]),
        site.cfg.image_size,
    )
    arrays_into_model(model, message.content[wire.ARRAYS])
    return model, int(config[wire.NUM_CLASSES]), int(config[wire.SERVER_ROUND])


_LOCAL_NORM = "flower-focal.local-norm"


def _restore_local_norm(model, context: Context) -> None:
    """FedBN: put this institution's own normalisation layers into ``model`` (if it has them yet)."""
    held = context.state.array_records.get(_LOCAL_NORM)
    if held is None:
        return  # first round here: the global (initial) values are where it starts
    state = model.state_dict()
    local = held.to_torch_state_dict()
    for key, value in local.items():
        if key in state and state[key].shape == value.shape:
            state[key].copy_(value)


def _keep_local_norm(model, context: Context) -> None:
    """FedBN: keep this institution's normalisation layers in its ``context.state``."""
    from flwr.app import ArrayRecord

    from flower_focal.models import norm_keys

    state = model.state_dict()
    context.state[_LOCAL_NORM] = ArrayRecord({k: state[k].detach().cpu() for k in norm_keys(model)})


_PERSONAL = "flower-focal.ditto-personal"


def _personal_model(model, held):
    """A copy of ``model`` holding the personal model's state ``held`` (an ArrayRecord)."""
    import copy

    from flower_focal.models import arrays_into_model

    return arrays_into_model(copy.deepcopy(model), held)


class _DittoRound:
    """Ditto's personal update of one train round (Li et al., ICML 2021, Algorithm 1).

    Made *before* the global model is trained: it holds a copy of the received global ``w``
    (under ``fedbn`` with this institution's own normalisation layers, as local training starts
    from it) and starts the personal model ``v`` from this institution's ``context.state``, or
    from ``w`` when it has none yet.
    """

    def __init__(self, received, context: Context) -> None:
        import copy

        self.context = context
        self.reference = {n: p.detach().clone() for n, p in received.named_parameters()}
        held = context.state.array_records.get(_PERSONAL)
        self.personal = copy.deepcopy(received) if held is None else _personal_model(received, held)

    def train(self, site: Site, *, lr: float, device, seed: int) -> dict[str, float]:
        """``personal-epochs`` of ``v`` towards ``w`` (same optimiser and data as the global's
        local training); keeps ``v`` in ``context.state`` and returns its training metrics."""
        from flwr.app import ArrayRecord

        from flower_focal.training import train_local

        cfg = site.cfg
        metrics = train_local(
            self.personal, site.data.train, epochs=cfg.personal_epochs, lr=lr, seed=seed,
            prox_mu=cfg.ditto_lambda, prox_reference=self.reference, **_optimiser_settings(cfg, device))
        state = self.personal.state_dict()
        self.context.state[_PERSONAL] = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})
        return metrics


def train(message: Message, context: Context) -> Message:
    """Train the received global model on local data; reply with weights and metrics.

    With ``fedbn`` the normalisation layers are this institution's own (kept in
    ``context.state``) and the reply carries the *received* values for them: their average
    stays the initial model's, and no local statistic leaves the institution (under he-fedavg
    they are not even encrypted: the server's layout leaves them out of the vector and
    :mod:`flower_focal.client.he_mod` uploads the rest only).

    With ``ditto-lambda > 0`` (Ditto) this institution also trains its personal model ``v``
    (kept in ``context.state``; the first global it trains from is its first value) for
    ``personal-epochs`` on the same data, with the round's lr, towards the *received* global
    ``w`` (proximal term ``ditto-lambda / 2 * ||v - w||^2``). The reply is exactly what it is
    without Ditto: ``v`` never leaves the institution.
    """
    from flower_focal.models import model_to_arrays, norm_keys
    from flower_focal.training import resolve_device, round_lr, train_local

    site = site_from_context(context)
    model, _, server_round = _global_model(site, message)
    cfg = site.cfg
    if cfg.ditto_lambda:
        check_personalisation(cfg)
    if cfg.fedbn:
        _restore_local_norm(model, context)
    ditto = _DittoRound(model, context) if cfg.ditto_lambda > 0 else None
    lr = round_lr(cfg.lr, cfg.lr_schedule, server_round, cfg.num_server_rounds)
    device = resolve_device(cfg.device)
    seed = local_seed(cfg.seed, site.partition_id, server_round)
    metrics = train_local(model, site.data.train, epochs=cfg.local_epochs, lr=lr, seed=seed,
                          prox_mu=cfg.fedprox_mu, **_optimiser_settings(cfg, device))
    log(INFO, "institution %d round %d: %s", site.partition_id, server_round, metrics)
    if ditto is not None:
        personal = ditto.train(site, lr=lr, device=device, seed=seed + 2)
        log(INFO, "institution %d round %d: personal model (Ditto) %s", site.partition_id, server_round,
            personal)
    arrays = model_to_arrays(model)
    if cfg.fedbn:
        _keep_local_norm(model, context)
        received = message.content[wire.ARRAYS]
        for key in norm_keys(model):
            arrays[key] = received[key]
    content = RecordDict(
        {wire.ARRAYS: arrays, wire.METRICS: MetricRecord(metrics)}
    )
    return Message(content, reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the received global model on local validation data.

    With ``fedbn`` the model uses this institution's own normalisation layers. With
    ``ditto-lambda > 0`` the ``personal-`` metrics are those of this institution's Ditto
    personal model (see :func:`train`; before it has trained, the received global's). Otherwise,
    with ``personal-epochs > 0`` a copy is fine-tuned on the local training data (constant
    ``personal-lr``, seeded) and its metrics are reported next to the global model's, prefixed
    ``personal-``; the copy is not kept.
    """
    import copy

    from flower_focal.training import evaluate_model, resolve_device, train_local

    site = site_from_context(context)
    cfg = site.cfg
    if cfg.ditto_lambda:
        check_personalisation(cfg)
    model, num_classes, server_round = _global_model(site, message)
    if cfg.fedbn:
        _restore_local_norm(model, context)
    device = resolve_device(cfg.device)
    metrics = evaluate_model(model, site.data.val, batch_size=cfg.batch_size, device=device,
                             num_classes=num_classes)
    if cfg.ditto_lambda > 0 and metrics[wire.NUM_EXAMPLES] > 0:
        held = context.state.array_records.get(_PERSONAL)
        personal = metrics if held is None else evaluate_model(
            _personal_model(model, held), site.data.val, batch_size=cfg.batch_size, device=device,
            num_classes=num_classes)
        for key in (wire.LOSS, wire.ACCURACY, wire.AUROC):
            metrics[wire.PERSONAL_PREFIX + key] = personal[key]
    elif cfg.personal_epochs > 0 and metrics[wire.NUM_EXAMPLES] > 0:
        tuned = copy.deepcopy(model)
        train_local(tuned, site.data.train, epochs=cfg.personal_epochs, lr=cfg.personal_lr,
                    seed=local_seed(cfg.seed, site.partition_id, server_round) + 1,
                    **_optimiser_settings(cfg, device))
        personal = evaluate_model(tuned, site.data.val, batch_size=cfg.batch_size, device=device,
                                  num_classes=num_classes)
        for key in (wire.LOSS, wire.ACCURACY, wire.AUROC):
            metrics[wire.PERSONAL_PREFIX + key] = personal[key]
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=message)
