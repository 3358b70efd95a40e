"""Which institution is behind which Flower node, and deterministic node sampling.

Flower gives nodes random 64-bit IDs and returns them in arbitrary order, so seeding the
ServerApp is not enough for reproducible rounds (see ``shared/notes/flower-1.41.md``, §7).
:class:`InstitutionRoster` asks every node once (a QUERY message, action ``describe``) for
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

from flower_focal import keys


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
    """Maps Flower node IDs to institutions; owns deterministic sampling order."""

    def __init__(self, timeout: float = 600.0) -> None:
        self.timeout = timeout
        self._by_node: dict[int, Institution] = {}
        self._failed: set[int] = set()

    # ------------------------------------------------------------------ discovery
    def refresh(self, grid: Grid) -> None:
        """Ask every node not yet known for its description (one QUERY message each)."""
        unknown = [n for n in grid.get_node_ids() if n not in self._by_node]
        if not unknown:
            return
        messages = [
            Message(
                content=RecordDict({keys.CONFIG: ConfigRecord({"action": "describe"})}),
                message_type=MessageType.QUERY,
                dst_node_id=node_id,
            )
            for node_id in unknown
        ]
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self._failed.add(node_id)
                log(WARNING, "Node %d failed to describe itself: %s", node_id, reply.error.reason)
                continue
            info = reply.content[keys.CONFIG]
            self.register(Institution(
                node_id=node_id,
                partition_id=int(info[keys.PARTITION_ID]),
                num_classes=int(info[keys.NUM_CLASSES]),
                in_channels=int(info[keys.IN_CHANNELS]),
                num_train=int(info.get(keys.NUM_TRAIN, 0)),
            ))
        log(INFO, "Roster: %d institutions known", len(self._by_node))

    def register(self, institution: Institution) -> None:
        """Record what a node said about itself."""
        self._by_node[institution.node_id] = institution
        self._failed.discard(institution.node_id)

    def data_shape(self, grid: Grid) -> DataShape:
        """Discover the federation and return the model-defining data shape.

        Raises
        ------
        RuntimeError
            If no institution answered, or institutions disagree on the channel count.
        """
        self.refresh(grid)
        if not self._by_node:
            raise RuntimeError(
                "No institution answered the describe query; check the ClientApp logs "
                "(data path, node config) of every SuperNode."
            )
        channels = {i.in_channels for i in self._by_node.values()}
        if len(channels) != 1:
            raise RuntimeError(f"Institutions disagree on image channels: {sorted(channels)}")
        num_classes = max(i.num_classes for i in self._by_node.values())
        return DataShape(num_classes=num_classes, in_channels=channels.pop())

    def total_train_examples(self) -> int:
        """Training examples over all known institutions (public: FedAvg reveals each n_i)."""
        return sum(i.num_train for i in self._by_node.values())

    # ------------------------------------------------------------------ ordering
    def partition_of(self, node_id: int) -> int:
        """Partition id of a node (``-1`` for a node that never described itself)."""
        inst = self._by_node.get(node_id)
        return inst.partition_id if inst is not None else -1

    def ordered_node_ids(self, node_ids: Iterable[int]) -> list[int]:
        """Known nodes among ``node_ids`` in partition order (unknown nodes are left out)."""
        known = [n for n in node_ids if n in self._by_node]
        return sorted(known, key=lambda n: (self._by_node[n].partition_id, n))

    def sort_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Replies in partition order, so floating-point sums do not depend on arrival."""
        return sorted(replies, key=lambda m: self.partition_of(m.metadata.src_node_id))


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
