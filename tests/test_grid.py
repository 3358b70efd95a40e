"""PromptGrid: replies are collected as they arrive, Flower's timeout semantics are kept."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from clients.client_app import app as client_app
from flower_focal.config import RunConfig
from flower_focal.grid import PromptGrid
from flower_focal.testing import LoopbackGrid


class SlowGrid(LoopbackGrid):
    """Node ``i``'s reply becomes pullable ``delays[i]`` seconds after the push."""

    def __init__(self, delays):
        super().__init__(client_app, len(delays), RunConfig(num_samples=60).to_flower())
        self.delay = dict(zip(self.node_ids, delays))
        self.ready_at: dict[str, float] = {}
        self.pull_times: list[float] = []

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        now = self.pushed_at = time.monotonic()
        for msg, mid in zip(messages, ids):
            self.ready_at[mid] = now + self.delay[msg.metadata.dst_node_id]
        return ids

    def pull_messages(self, message_ids):
        self.pull_times.append(time.monotonic())
        now = time.monotonic()
        return super().pull_messages([m for m in message_ids if self.ready_at.get(m, 1e18) <= now])


def _queries(grid):
    return [Message(RecordDict({"config": ConfigRecord({"action": "describe"})}), dst_node_id=nid,
                    message_type="query.describe") for nid in grid.get_node_ids()]


def test_all_replies_are_returned_soon_after_the_last_one_arrives():
    inner = SlowGrid([0.05, 0.3, 0.6])
    grid = PromptGrid(inner, max_poll_s=0.1)
    replies = list(grid.send_and_receive(_queries(inner), timeout=None))
    returned = time.monotonic()
    assert sorted(r.metadata.src_node_id for r in replies) == sorted(inner.node_ids)
    assert not any(r.has_error() for r in replies)
    last = max(inner.ready_at.values())
    assert 0 <= returned - last < 0.1 + 1.0  # Flower's own grid polls every 3 s (slack for a loaded CI box)
    assert sorted(b - a for a, b in zip(inner.pull_times, inner.pull_times[1:]))[len(inner.pull_times) // 2] <= 0.1 + 0.05


def test_timeout_returns_the_replies_that_arrived_and_stops_waiting():
    inner = SlowGrid([0.05, 5.0, 0.1])
    grid = PromptGrid(inner, max_poll_s=0.1)
    replies = list(grid.send_and_receive(_queries(inner), timeout=2.0))
    assert time.monotonic() - inner.pushed_at < 2.0 + 1.0  # the node that needs 5 s is not waited for
    assert sorted(r.metadata.src_node_id for r in replies) == sorted([inner.node_ids[0], inner.node_ids[2]])


def test_wrapping_is_idempotent_and_bad_intervals_are_refused():
    inner = SlowGrid([0.0])
    assert PromptGrid(PromptGrid(inner)).inner is inner
    assert list(PromptGrid(inner).get_node_ids()) == inner.node_ids
    with pytest.raises(ValueError, match="poll"):
        PromptGrid(inner, first_poll_s=1.0, max_poll_s=0.5)


def test_start_on_a_plain_grid_hands_every_reply_to_on_reply_as_it_arrives(monkeypatch):
    """A foreign ServerApp calls ``strategy.start(grid=...)`` with Flower's grid: ``start`` puts a
    PromptGrid around it whose ``on_reply`` is the strategy's (HE-FedAvg sums ciphertexts there).
    The institutions are the quickstart-style foreign app's (own Net, DataLoader, keys)."""
    from pathlib import Path

    from flwr.app import ArrayRecord, ConfigRecord

    from flower_focal.strategy import FedAvg
    from flower_focal.testing import LoopbackGrid

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "foreign_app"))
    from quickstart.client_app import app as foreign_client
    from quickstart.task import Net

    arrived: list[str] = []

    class Watching(FedAvg):
        def on_reply(self, reply):
            arrived.append(reply.metadata.message_type)
            return super().on_reply(reply)

    grid = LoopbackGrid(foreign_client, 2, {"local-epochs": 1, "learning-rate": 0.05, "batch-size": 16})
    Watching(min_available_nodes=2).start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                                          num_rounds=1, train_config=ConfigRecord({"lr": 0.05}))
    # every reply, the roster's describe queries too (the foreign app answers them with an error)
    assert sorted(t for t in arrived if t in ("train", "evaluate")) == ["evaluate", "evaluate", "train", "train"]
    assert len(arrived) == 6
    assert not hasattr(grid, "on_reply")  # the caller's grid itself is left alone (wrapped, not patched)
