"""Which institution is behind which Flower node, and deterministic node sampling.

Flower gives nodes random 64-bit IDs and returns them in arbitrary order, so seeding the
ServerApp is not enough for reproducible rounds. :class:`InstitutionRoster` asks every node
once (a ``query.describe`` message) for
its partition id and data shape, then lists nodes in partition order. Strategies sample from
that ordered list with a round-seeded RNG and sort replies by partition before aggregating,
which makes a run bit-reproducible for a given seed. Nodes that join later (a restarted
SuperNode in a deployment) are asked when they first appear.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from flower_focal import wire


def short_reason(reason: str, limit: int = 300) -> str:
    """The gist of a Flower error reason (the simulation engine wraps it in a Ray traceback)."""
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1]
    reason = " ".join(reason.split()).rstrip("'>")
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


@dataclass(frozen=True)
class Institution:
    """What the server knows about one institution: no labels, no data statistics."""

    node_id: int
    partition_id: int
    num_classes: int
    in_channels: int
    num_train: int = 0


@dataclass(frozen=True)
class DataShape:
    """Model-defining facts agreed by all institutions."""

    num_classes: int
    in_channels: int


class InstitutionRoster:
    """Maps Flower node IDs to institutions; owns deterministic sampling order.

    A node whose ClientApp does not answer the describe query (a foreign app that registers
    no ``query.describe`` handler, or one that fails) is not left out: it is kept as an
    *undescribed* node, listed after the described ones in node-id order, and labelled by its
    node id in the history. What that costs is logged once (see :meth:`refresh`).
    """

    def __init__(self, timeout: float = 600.0) -> None:
        self.timeout = timeout
        self._by_node: dict[int, Institution] = {}
        self._undescribed: dict[int, str] = {}  # node id -> why it did not describe itself
        self._warned = False

    # ------------------------------------------------------------------ discovery
    def refresh(self, grid: Grid) -> None:
        """Ask every node not yet seen for its description (one QUERY message each)."""
        unknown = [n for n in grid.get_node_ids() if n not in self._by_node and n not in self._undescribed]
        if not unknown:
            return
        messages = [
            Message(
                content=RecordDict({wire.CONFIG: ConfigRecord({"action": wire.ACTION_DESCRIBE})}),
                message_type=f"{MessageType.QUERY}.{wire.ACTION_DESCRIBE}",
                dst_node_id=node_id,
            )
            for node_id in unknown
        ]
        answered = set()
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node_id = reply.metadata.src_node_id
            answered.add(node_id)
            if reply.has_error():
                self._undescribed[node_id] = short_reason(reply.error.reason)
                continue
            try:
                info = reply.content[wire.CONFIG]
                institution = Institution(
                    node_id=node_id,
                    partition_id=int(info[wire.PARTITION_ID]),
                    num_classes=int(info[wire.NUM_CLASSES]),
                    in_channels=int(info[wire.IN_CHANNELS]),
                    num_train=int(info.get(wire.NUM_TRAIN, 0)),
                )
            except (KeyError, TypeError, ValueError) as exc:
                self._undescribed[node_id] = f"unexpected describe reply ({exc!r})"
                continue
            self.register(institution)
        for node_id in unknown:
            if node_id not in answered:
                self._undescribed[node_id] = f"no describe reply within {self.timeout:g} s"
        self._warn_undescribed()
        log(INFO, "Roster: %d institutions described, %d undescribed", len(self._by_node),
            len(self._undescribed))

    def _warn_undescribed(self) -> None:
        if self._warned or not self._undescribed:
            return
        self._warned = True
        node, reason = next(iter(self._undescribed.items()))
        log(WARNING,
            "flower-focal: %d node(s) did not answer the describe query (node %d: %s). Falling back "
            "to Flower's defaults for them: they are sampled and their replies aggregated in node-id "
            "order (reproducible only as far as node ids are, not bit-identical across runs), "
            "labelled by node id in the history, and weighted by the num-examples of their replies "
            "(HE-FedAvg asks them for it with one extra exchange per round). Register "
            "flower_focal.client.handlers.describe_handler(...) as @app.query(\"describe\") to keep "
            "partition order.", len(self._undescribed), node, reason)

    def register(self, institution: Institution) -> None:
        """Record what a node said about itself."""
        self._by_node[institution.node_id] = institution
        self._undescribed.pop(institution.node_id, None)

    def undescribed_reasons(self) -> dict[int, str]:
        """Nodes that did not describe themselves, with the reason (error text) of each."""
        return dict(self._undescribed)

    def is_described(self, node_id: int) -> bool:
        """Whether ``node_id`` answered the describe query."""
        return node_id in self._by_node

    def data_shape(self, grid: Grid) -> DataShape:
        """Discover the federation and return the model-defining data shape.

        Raises
        ------
        RuntimeError
            If no institution answered (the message carries the first node's error), or
            institutions disagree on the channel count.
        """
        self.refresh(grid)
        if not self._by_node:
            first = next(iter(self._undescribed.items()), None)
            cause = f" First error, node {first[0]}: {first[1]}" if first else " No node is connected."
            raise RuntimeError(
                "No institution answered the describe query, so the model's shape is unknown "
                "(a flower-focal ClientApp answers it; check data path and node config of every "
                f"SuperNode).{cause}"
            )
        channels = {i.in_channels for i in self._by_node.values()}
        if len(channels) != 1:
            raise RuntimeError(f"Institutions disagree on image channels: {sorted(channels)}")
        num_classes = max(i.num_classes for i in self._by_node.values())
        return DataShape(num_classes=num_classes, in_channels=channels.pop())

    def total_train_examples(self) -> int:
        """Training examples over all described institutions (public: FedAvg reveals each n_i)."""
        return sum(i.num_train for i in self._by_node.values())

    def sizes_known(self, node_ids: Iterable[int]) -> bool:
        """Whether every node in ``node_ids`` described itself with a training-set size."""
        return all(n in self._by_node and self._by_node[n].num_train > 0 for n in node_ids)

    # ------------------------------------------------------------------ ordering
    def partition_of(self, node_id: int) -> int:
        """Partition id of a node (``-1`` for a node that never described itself)."""
        inst = self._by_node.get(node_id)
        return inst.partition_id if inst is not None else -1

    def label_of(self, node_id: int) -> int:
        """How the history names a node: its partition id, or its node id when undescribed."""
        inst = self._by_node.get(node_id)
        return inst.partition_id if inst is not None else node_id

    def ordered_node_ids(self, node_ids: Iterable[int]) -> list[int]:
        """Seen nodes among ``node_ids``: described ones in partition order, then undescribed
        ones in node-id order (nodes never asked are left out)."""
        ids = list(node_ids)
        known = sorted((n for n in ids if n in self._by_node), key=lambda n: (self._by_node[n].partition_id, n))
        return known + sorted(n for n in ids if n in self._undescribed)

    def sort_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Replies in roster order, so floating-point sums do not depend on arrival."""
        def order(m: Message) -> tuple[int, int, int]:
            node = m.metadata.src_node_id
            inst = self._by_node.get(node)
            return (0, inst.partition_id, node) if inst is not None else (1, 0, node)

        return sorted(replies, key=order)


class OrderedGrid:
    """A view of a :class:`~flwr.serverapp.Grid` that lists known nodes in partition order.

    Flower's samplers call ``grid.get_node_ids()`` and ``random.sample`` on the result; with
    this view and :func:`seeded_random`, that sample becomes a pure function of the seed.
    """

    def __init__(self, grid: Grid, roster: InstitutionRoster) -> None:
        self._grid = grid
        self._roster = roster

    def get_node_ids(self) -> list[int]:
        """Known node IDs in partition order."""
        return self._roster.ordered_node_ids(self._grid.get_node_ids())

    def __getattr__(self, name: str):  # delegate everything else to the real grid
        return getattr(self._grid, name)


@contextlib.contextmanager
def seeded_random(seed: int, server_round: int, phase: str) -> Iterator[None]:
    """Temporarily seed Python's ``random`` (used by Flower's ``sample_nodes``).

    The previous global RNG state is restored afterwards.
    """
    state = random.getstate()
    random.seed(f"{seed}:{server_round}:{phase}")
    try:
        yield
    finally:
        random.setstate(state)
