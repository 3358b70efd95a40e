"""A Flower :class:`~flwr.serverapp.Grid` that collects replies as soon as they arrive.

Flower's ``HttpGrid.send_and_receive`` (1.41, 1.42) (the grid a ServerApp gets from the SuperLink,
in simulation and deployment alike) pushes the messages and then pulls replies every
**3 seconds**. Every exchange therefore ends on a 3 s tick: a training phase that takes
3.1 s costs 6 s, and FOCAL, which has several exchanges per round, pays the tick on each.
:class:`PromptGrid` wraps any grid and implements ``send_and_receive`` with the grid's own
``push_messages`` / ``pull_messages`` and a short, growing poll interval (from
``first_poll_s`` up to ``max_poll_s``), so a phase ends within ``max_poll_s`` of its last
reply. Everything else is delegated unchanged, and the return value has Flower's meaning:
the replies that arrived before ``timeout`` (all of them when ``timeout`` is ``None``).

``on_reply`` (a strategy's :meth:`~flower_focal.strategy.base.RecordingStrategy.on_reply`) is
applied to every reply the moment it is pulled (HE-FedAvg adds each ciphertext into the running
sum there and drops it, so the sum is ready when the last reply lands and the server holds about
one model).

This module is Flower glue only; :func:`flower_focal.server.run_server` wraps the grid it
is given, so every strategy (and a consortium's own ServerApp that calls ``run_server``)
gets it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["PromptGrid"]


class PromptGrid(Grid):
    """Delegate to ``inner``; poll for replies every ``first_poll_s`` .. ``max_poll_s`` seconds.

    Parameters
    ----------
    inner : Grid
        The grid Flower handed to the ServerApp.
    on_reply : Callable[[Message], Message], optional
        Applied to each reply as it arrives; its return value is what the caller gets.
    first_poll_s, max_poll_s : float
        The poll interval starts at ``first_poll_s`` after the push and grows by half on
        every empty pull, up to ``max_poll_s``; a pull that brings replies resets it.
    """

    def __init__(self, inner: Grid, *, on_reply: Callable[[Message], Message] | None = None,
                 first_poll_s: float = 0.02, max_poll_s: float = 0.25) -> None:
        if isinstance(inner, PromptGrid):
            inner = inner.inner  # one level of wrapping, whoever wraps twice
        if not 0 < first_poll_s <= max_poll_s:
            raise ValueError(f"need 0 < first_poll_s <= max_poll_s, got {first_poll_s}, {max_poll_s}")
        self.inner = inner
        self.first_poll_s = first_poll_s
        self.max_poll_s = max_poll_s
        self.pulls = 0
        self.on_reply = on_reply

    # ---------------------------------------------------------------- delegated
    def set_run(self, run: Any) -> None:  # noqa: D102 - Grid's
        self.inner.set_run(run)

    @property
    def run(self) -> Any:  # noqa: D102 - Grid's
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102 - Grid's
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - Grid's
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:  # noqa: D102 - Grid's
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102 - Grid's
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102 - Grid's
        self.pulls += 1
        return self.inner.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:
        # Anything a concrete grid adds (close(), node, ...) stays reachable.
        return getattr(self.inner, name)

    # ---------------------------------------------------------------- the change
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; return the replies that arrive before ``timeout`` (None: all)."""
        pending = {mid for mid in self.push_messages(messages) if mid}
        del messages
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        interval = self.first_poll_s
        while pending:
            got = list(self.pull_messages(pending))
            if got and self.on_reply is not None:
                got = [self.on_reply(m) for m in got]
            if got:
                replies.extend(got)
                pending.difference_update(m.metadata.reply_to_message_id for m in got)
                interval = self.first_poll_s
                if not pending:
                    break
            else:
                interval = min(interval * 1.5, self.max_poll_s)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(interval, left))
            else:
                time.sleep(interval)
        return replies
