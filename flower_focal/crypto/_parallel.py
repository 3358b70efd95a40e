"""Process-pool workers for parallel encryption (TenSEAL/SEAL encryption holds the GIL).

Spawn-safe: everything a worker needs arrives through :func:`init_worker`'s arguments (the
preset parameters and the secret key sections), and each worker builds its backend once.
The secret key therefore crosses a local pipe to child processes of the institution that
already holds it; it is never written to disk by this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flower_focal.crypto.backends import Backend, backend_for
from flower_focal.crypto.params import HEPreset

_BACKEND: Backend | None = None


def init_worker(preset_params: Mapping[str, Any], sections: Mapping[str, bytes]) -> None:
    """Pool initializer: load the secret context once per worker process."""
    global _BACKEND
    preset = HEPreset.from_params(dict(preset_params))
    _BACKEND = backend_for(preset).from_sections(preset, sections)


def encrypt_slice(values: np.ndarray) -> list[bytes]:
    """Encrypt a slice that starts on a chunk boundary; one ``bytes`` per chunk."""
    if _BACKEND is None:
        raise RuntimeError("encrypt_slice ran in a process that init_worker did not set up")
    return _BACKEND.encrypt(values)
