"""Shared helpers: fabricated replies, shared data, synthetic .npz files.

The loopback grid (real ClientApp, no Ray) is :class:`flower_focal.testing.LoopbackGrid`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from flwr.app import Message, Metadata, RecordDict

from flower_focal._compat import set_task_identity

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
