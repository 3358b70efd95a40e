"""FOCAL's typed errors: which institution's upload the server could not use."""

from __future__ import annotations

from flower_focal.crypto.errors import CiphertextError


class InstitutionUploadError(CiphertextError):
    """An institution's upload (embeddings or error) cannot be used; ``institution`` names it.

    Callers drop that institution and go on with the others, without reading the message.
    Picklable (raised in the server's worker processes too).
    """

    def __init__(self, institution: str, reason: str) -> None:
        super().__init__(f"institution {institution!r}: {reason}")
        self.institution = institution
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.institution, self.reason))


class LogitOverflow(ValueError):
    """Decrypted forward partial sums beyond the level plan's safe range (the head grew too
    large: a step far too big). The loss guard treats it as a rise (rollback, halve the step)."""


class FocalDiverged(RuntimeError):
    """The institutions' decrypted training loss kept rising although the step was halved
    ``max_backoffs`` times: training stops (the head is left at its last accepted value)."""
