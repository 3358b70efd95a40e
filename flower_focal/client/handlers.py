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

from flower_focal import keys
from flower_focal.config import RunConfig

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
    if keys.NODE_DATA_PATH in node:
        cfg = cfg.replace(data_path=str(node[keys.NODE_DATA_PATH]))
    if keys.NODE_DEVICE in node:
        cfg = cfg.replace(device=str(node[keys.NODE_DEVICE]))
    partition_id = int(node.get(keys.NODE_PARTITION_ID, 0))
    num_partitions = int(node.get(keys.NODE_NUM_PARTITIONS, 1))
    data = load_institution(cfg, partition_id, num_partitions)
    return Site(cfg, partition_id, num_partitions, data)


def local_seed(seed: int, partition_id: int, server_round: int) -> int:
    """Seed of one institution's local work in one round (distinct, reproducible)."""
    return (seed * 1_000_003 + partition_id * 10_007 + server_round) % (2**31 - 1)


def describe(message: Message, context: Context) -> Message:
    """Answer the server's describe query: partition id and data shape, no label statistics."""
    site = site_from_context(context)
    info = ConfigRecord(
        {
            keys.PARTITION_ID: site.partition_id,
            keys.NUM_CLASSES: site.data.num_classes,
            keys.IN_CHANNELS: site.data.in_channels,
            keys.NUM_TRAIN: site.data.n_train,
        }
    )
    return Message(RecordDict({keys.CONFIG: info}), reply_to=message)


def describe_handler(num_train: Callable[[Context], int]) -> Callable[[Message, Context], Message]:
    """A ``query.describe`` handler for *any* ClientApp (optional).

    Register it as ``app.query("describe")(describe_handler(lambda ctx: len(my_trainset)))``.
    The server then knows each institution's partition (node config ``partition-id``, else the
    node id) and training-set size before the first round: sampling and aggregation follow
    partition order (bit-reproducible runs) and HE-FedAvg needs no extra exchange per round.
    It reads nothing of the app's run config.
    """

    def describe(message: Message, context: Context) -> Message:
        partition = context.node_config.get(keys.NODE_PARTITION_ID, context.node_id)
        info = ConfigRecord({keys.PARTITION_ID: int(partition), keys.NUM_CLASSES: 0,
                             keys.IN_CHANNELS: 0, keys.NUM_TRAIN: int(num_train(context))})
        return Message(RecordDict({keys.CONFIG: info}), reply_to=message)

    return describe


def _global_model(site: Site, message: Message):
    from flower_focal.models import arrays_into_model, build_model

    config = message.content[keys.CONFIG]
    model = build_model(
        site.cfg.model,
        int(config[keys.IN_CHANNELS]),
        int(config[keys.NUM_CLASSES]),
        site.cfg.image_size,
    )
    arrays_into_model(model, message.content[keys.ARRAYS])
    return model, int(config[keys.NUM_CLASSES]), int(config[keys.SERVER_ROUND])


def train(message: Message, context: Context) -> Message:
    """Train the received global model on local data; reply with weights and metrics."""
    from flower_focal.models import model_to_arrays
    from flower_focal.training import resolve_device, train_local

    site = site_from_context(context)
    model, _, server_round = _global_model(site, message)
    cfg = site.cfg
    metrics = train_local(
        model,
        site.data.train,
        epochs=cfg.local_epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        optimizer=cfg.optimizer,
        device=resolve_device(cfg.device),
        seed=local_seed(cfg.seed, site.partition_id, server_round),
        num_workers=None if cfg.num_workers < 0 else cfg.num_workers,
        precision=cfg.precision,
    )
    log(INFO, "institution %d round %d: %s", site.partition_id, server_round, metrics)
    content = RecordDict(
        {keys.ARRAYS: model_to_arrays(model), keys.METRICS: MetricRecord(metrics)}
    )
    return Message(content, reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the received global model on local validation data."""
    from flower_focal.training import evaluate_model, resolve_device

    site = site_from_context(context)
    model, num_classes, _ = _global_model(site, message)
    metrics = evaluate_model(
        model,
        site.data.val,
        batch_size=site.cfg.batch_size,
        device=resolve_device(site.cfg.device),
        num_classes=num_classes,
    )
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=message)
