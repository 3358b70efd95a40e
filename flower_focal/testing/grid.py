"""A Flower Grid that delivers messages to real ClientApps in this process (no Ray, no SuperLink).

:class:`LoopbackGrid` is what the test suite, the privacy audit and the benchmarks drive
strategies with: :func:`flower_focal.server.run_server` (or a strategy's ``start``) talks to it
exactly as to the grid a ServerApp gets, and every node runs the given ``ClientApp`` on a copy
of the message, as if it had been serialised. It records the traffic: ``sent`` (a copy of
every message the server sent) and ``received`` (a copy of every reply, as it arrived; a
strategy may consume a reply afterwards, HE-FedAvg drops each ciphertext once it is summed).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from flower_focal import wire

__all__ = ["LoopbackGrid", "ensure_task_identity"]


def ensure_task_identity() -> None:
    """Let this process build Flower messages (Flower sets this itself in a ServerApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    from flower_focal._compat import set_task_identity

    try:
        TaskIdentity.run_id  # noqa: B018 - raises RuntimeError when unset
    except RuntimeError:
        set_task_identity(run_id=1, node_id=0)


class LoopbackGrid:
    """Run ``app`` for ``num_nodes`` nodes in this process; replies wait until pulled.

    Node ``i`` gets ``node_config = {"partition-id": i, "num-partitions": n}`` like Flower's
    simulation engine (or ``node_configs[i]``). Node IDs are deliberately not in partition
    order, and replies are pulled in an order unrelated to send order, so nothing may rely on
    either.

    Attributes
    ----------
    down : set[int]
        Nodes that never answer (a dead SuperNode).
    crash_from_round : dict[int, int]
        Node -> first ``server-round`` whose messages make it raise (an error reply).
    sent, received : list[Message]
        Copies of every message the server sent / every reply that reached it.
    """

    def __init__(self, app: ClientApp, num_nodes: int, run_config: Mapping[str, Any],
                 node_configs: Sequence[Mapping[str, Any]] | None = None) -> None:
        ensure_task_identity()
        self.app = app
        self.node_ids = [1000 + 7919 * (num_nodes - i) for i in range(num_nodes)]
        self.partition = {nid: i for i, nid in enumerate(self.node_ids)}
        self.contexts = {
            nid: Context(
                run_id=1, node_id=nid,
                node_config=(dict(node_configs[i]) if node_configs else
                             {wire.NODE_PARTITION_ID: i, wire.NODE_NUM_PARTITIONS: num_nodes}),
                state=RecordDict(), run_config=dict(run_config),
            )
            for i, nid in enumerate(self.node_ids)
        }
        self.down: set[int] = set()
        self.crash_from_round: dict[int, int] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.outbox: dict[str, Message] = {}  # replies not pulled yet

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver every message now; replies wait in :attr:`outbox` until pulled."""
        from flower_focal._compat import stamp_message_id

        ids = []
        for msg in messages:
            stamp_message_id(msg)
            dst = msg.metadata.dst_node_id
            ids.append(msg.metadata.message_id)
            if dst in self.down:
                continue  # a dead node never answers
            self.sent.append(copy.deepcopy(msg))  # the content object is reused by later rounds
            config = msg.content.config_records.get(wire.CONFIG, {})
            try:
                if config.get(wire.SERVER_ROUND, 0) >= self.crash_from_round.get(dst, 10**9):
                    raise RuntimeError(f"node {dst} crashed")
                # a copy, as if serialised: handlers and mods must not touch the server's object
                reply = self.app(copy.deepcopy(msg), self.contexts[dst])
            except Exception as exc:  # what Flower's engine does with a ClientApp exception
                reply = Message(Error(code=1, reason=repr(exc)), reply_to=msg)
            self.outbox[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies to ``message_ids`` that are waiting, in reverse id order (not send order)."""
        replies = [self.outbox.pop(mid) for mid in sorted(message_ids, reverse=True) if mid in self.outbox]
        self.received.extend(copy.deepcopy(r) for r in replies)  # as it arrived
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        ids = self.push_messages(messages)
        return self.pull_messages([mid for mid in ids if mid in self.outbox])

    def replies(self, message_type: str) -> dict[int, Message]:
        """Received replies of one message type, by partition index (the last one per node)."""
        return {self.partition[r.metadata.src_node_id]: r for r in self.received
                if r.metadata.message_type == message_type}

    def sent_to(self, partition: int, message_type: str) -> list[Message]:
        """Messages of one type the server sent to node ``partition``, in order."""
        nid = self.node_ids[partition]
        return [m for m in self.sent
                if m.metadata.dst_node_id == nid and m.metadata.message_type == message_type]
