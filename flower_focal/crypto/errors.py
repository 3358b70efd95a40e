"""Exception types of :mod:`flower_focal.crypto` (no HE library needed to catch them)."""

from __future__ import annotations


class CiphertextError(ValueError):
    """A ciphertext blob is malformed, truncated, corrupted, or made under other keys/params.

    Raised *before* anything reaches SEAL whenever the envelope header can tell, and also
    wraps SEAL/TenSEAL load errors. A subclass of :class:`ValueError`, so callers that
    already reject bad input with ``except ValueError`` keep working.
    """


class ChunkChecksumError(CiphertextError):
    """One chunk of a ciphertext envelope does not match the CRC-32 its header announces
    (the message names the chunk). A :class:`CiphertextError`."""
