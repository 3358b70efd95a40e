"""The per-message timing mod: what a SuperNode's ClientApp process spends, logged (fast)."""

from __future__ import annotations

import logging
import re

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from flower_focal.client import timing
from tests.conftest import make_reply


def _message() -> Message:
    return make_reply(1, RecordDict({"metrics": MetricRecord({"x": 1.0})}), message_type="train")


def test_the_first_message_of_a_process_logs_process_imports_and_work_later_ones_work(caplog, monkeypatch):
    monkeypatch.setattr(timing, "_served", 0)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    message = _message()
    with caplog.at_level(logging.INFO, logger="flwr"):
        assert timing.message_timing_mod(message, context, lambda m, c: m) is message  # passes the reply
        assert timing.message_timing_mod(message, context, lambda m, c: m) is message
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(timing.PREFIX)]
    first = re.fullmatch(r"flower-focal message train: process ([\d.]+) s before flower-focal's import, "
                         r"imports ([\d.]+) s, work ([\d.]+) s", lines[0])
    assert first, lines
    assert 0 < float(first.group(1)) + float(first.group(2)) < timing.process_age_s() + 1
    assert re.fullmatch(r"flower-focal message train: work [\d.]+ s", lines[1]), lines


def test_a_failing_handler_is_timed_and_its_error_kept(caplog, monkeypatch):
    monkeypatch.setattr(timing, "_served", 3)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def broken(message, context):
        raise RuntimeError("out of memory")

    with caplog.at_level(logging.INFO, logger="flwr"), pytest.raises(RuntimeError, match="out of memory"):
        timing.message_timing_mod(_message(), context, broken)
    assert any(r.getMessage().startswith("flower-focal message train: work") for r in caplog.records)
