"""Every use of a non-public Flower detail lives here, so a Flower upgrade breaks one file."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Message


def stamp_message_id(message: Message) -> Message:
    """Give a server message the ID a SuperLink would (needed to reply to it in-process).

    Flower's own in-memory grid does exactly this (``InMemoryGrid.push_messages``).
    """
    message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return message


def set_task_identity(run_id: int, node_id: int = 0) -> None:
    """Set the run/node identity Flower stamps on new messages (done by Flower in a real run).

    Needed only to drive a strategy in-process, e.g. :class:`flower_focal.testing.LoopbackGrid`.
    """
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id


try:  # the config key Flower's DP wrappers use for the clipping norm
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
except ImportError:  # pragma: no cover - moved in another Flower version
    KEY_CLIPPING_NORM = "clipping_norm"


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that imports ``exports[name]`` on first use of ``name``."""
    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
