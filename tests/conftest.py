"""Shared fixtures: a loopback grid (real ClientApp, no Ray), fabricated replies, shared data."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp

from flower_focal._compat import set_task_identity, stamp_message_id

set_task_identity(run_id=1, node_id=0)  # what a ServerApp process has; lets tests build messages

# Prepared institution files (flower_focal.data.prepared) go to a directory of this test session
# (inherited by every simulation and deployment the tests start), never to a shared one.
_STORE = tempfile.mkdtemp(prefix="ff-test-data-store-")
os.environ["FLOWER_FOCAL_DATA_STORE"] = _STORE
atexit.register(shutil.rmtree, _STORE, ignore_errors=True)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_npz(name: str) -> Path:
    """Path to a real MedMNIST file in ../shared/data, or skip the test cleanly."""
    path = SHARED_DATA / name / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"real data not available at {path}")
    return path


def make_reply(src_node_id: int, content: RecordDict, message_type: str = "train") -> Message:
    """A reply message as a node would send it (for strategy hook tests)."""
    meta = Metadata(
        run_id=1, message_id="", src_node_id=src_node_id, dst_node_id=0,
        reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=3600.0,
        message_type=message_type,
    )
    return Message(metadata=meta, content=content)


class LoopbackGrid:
    """A Flower Grid that delivers messages to real ClientApps in this process (no Ray).

    Node ``i`` gets ``node_config = {"partition-id": i, "num-partitions": n}`` like the
    simulation engine; node IDs are deliberately not in partition order.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, node_configs=None):
        self.app = client_app
        self.node_ids = [1000 + 7919 * (num_nodes - i) for i in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=1, node_id=nid,
                node_config=(node_configs[i] if node_configs else {"partition-id": i, "num-partitions": num_nodes}),
                state=RecordDict(), run_config=dict(run_config),
            )
            for i, nid in enumerate(self.node_ids)
        }
        self.down: set[int] = set()  # nodes that never answer (a dead SuperNode)
        self.crash_from_round: dict[int, int] = {}  # node -> first round whose messages raise
        self.sent: list[Message] = []  # every message the server sent
        self.received: list[Message] = []  # every reply that reached the server
        self.outbox: dict[str, Message] = {}  # replies not pulled yet

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver every message now; replies wait in an outbox until pulled."""
        ids = []
        for msg in messages:
            stamp_message_id(msg)
            dst = msg.metadata.dst_node_id
            ids.append(msg.metadata.message_id)
            if dst in self.down:
                continue  # a dead node never answers
            self.sent.append(copy.deepcopy(msg))  # the content object is reused by later rounds
            config = msg.content.config_records.get("config", {})
            try:
                if config.get("server-round", 0) >= self.crash_from_round.get(dst, 10**9):
                    raise RuntimeError(f"node {dst} crashed")
                # a copy, as if serialised: handlers and mods must not touch the server's object
                reply = self.app(copy.deepcopy(msg), self.contexts[dst])
            except Exception as exc:  # what the engine does with a ClientApp exception
                reply = Message(Error(code=1, reason=repr(exc)), reply_to=msg)
            self.outbox[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies to ``message_ids`` that are waiting, in reverse id order (not send order)."""
        replies = [self.outbox.pop(mid) for mid in sorted(message_ids, reverse=True) if mid in self.outbox]
        self.received.extend(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        ids = self.push_messages(messages)
        return self.pull_messages([mid for mid in ids if mid in self.outbox])


@pytest.fixture
def loopback():
    return LoopbackGrid


def write_synthetic_npz(path: Path, name: str = "synthetic-pathology", sizes=(240, 60, 60), size: int = 28, seed: int = 3) -> Path:
    """A MedMNIST-format .npz (train/val/test) rendered by the built-in generator."""
    import numpy as np

    from flower_focal.data.synthetic import generate_image, synthetic_labels

    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        labels = synthetic_labels(name, split, n, seed)
        arrays[f"{split}_images"] = np.stack(
            [generate_image(name, int(y), i, split, seed, size) for i, y in enumerate(labels)]
        )
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path
