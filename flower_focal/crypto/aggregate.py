"""Server-side HE-FedAvg aggregation: add ciphertexts, never decrypt.

This module owns :class:`Accumulator`, the only thing the server does with ciphertexts. It
needs just a :class:`~flower_focal.crypto.keys.PublicContext` (no secret key), and it never
multiplies or rescales: clients must weight their update before encrypting (``n_i / sum(n)``
or ``n_i / C`` with a public constant ``C``), so the sum *is* the weighted average (or
``C``-scaled) and needs no spare modulus level.

Memory: uploads are added chunk by chunk into the running sum, so the server holds the sum
(one model), the upload's bytes and one decoded chunk at a time.
"""

from __future__ import annotations

from typing import Any

from flower_focal.crypto.envelope import EncryptedVector, chunk_lengths, make_vector
from flower_focal.crypto.errors import CiphertextError
from flower_focal.crypto.keys import PublicContext


class Accumulator:
    """Streaming sum of encrypted uploads that share one key set, preset and length.

    Callers must feed raw blobs from institutions to :meth:`add` (each is fully checked) and
    send :meth:`to_bytes` back to the institutions, who decrypt it with their
    :class:`~flower_focal.crypto.keys.SecretContext`. A blob that fails any check raises
    :class:`CiphertextError` and leaves the accumulator exactly as it was, so the server can
    drop that institution and carry on.

    Parameters
    ----------
    public
        The server's public context.
    """

    def __init__(self, public: PublicContext) -> None:
        if not isinstance(public, PublicContext):
            raise ValueError(
                f"Accumulator needs a PublicContext (the server never holds the secret key), "
                f"got {type(public).__name__}"
            )
        self._public = public
        self._backend = public._backend
        self._sum: list[Any] = []
        self._length: int | None = None
        self._count = 0
        self._summands = 0

    @property
    def count(self) -> int:
        """Number of blobs added so far."""
        return self._count

    @property
    def summands(self) -> int:
        """Number of institution uploads in the sum (a blob that is itself a sum counts all)."""
        return self._summands

    @property
    def length(self) -> int | None:
        """Vector length fixed by the first blob (``None`` while empty)."""
        return self._length

    def add(self, blob: bytes | bytearray | memoryview) -> None:
        """Check ``blob`` and add it into the running sum.

        Raises
        ------
        CiphertextError
            Malformed/truncated/corrupted blob, another key set or preset, a length that
            differs from earlier blobs, or a chunk SEAL refuses. The sum is unchanged.
        """
        preset = self._public.preset
        vec = EncryptedVector.from_bytes(blob, self._public.fingerprint, preset)
        if self._length is not None and vec.length != self._length:
            raise CiphertextError(
                f"upload has {vec.length} values but the running sum has {self._length}; all "
                "institutions must encrypt the same flattened model"
            )
        if self._summands + vec.summands >= 2**32:
            raise CiphertextError("too many summands for one accumulator")
        lengths = chunk_lengths(vec.length, preset)
        backend = self._backend
        with backend.io() as io:
            if not self._sum:
                # First blob: becomes the sum only once every chunk loaded and checked.
                self._sum = [backend.load(c, n, io) for c, n in zip(vec.chunks, lengths)]
            else:
                done = 0
                try:
                    for c, n in zip(vec.chunks, lengths):
                        backend.add_inplace(self._sum[done], backend.load(c, n, io))
                        done += 1
                except Exception as exc:
                    # Roll back: modular add/sub are exact inverses, so the sum is restored
                    # bit for bit. Chunks [0, done) loaded fine once and load again.
                    for i in range(done):
                        again = backend.load(vec.chunks[i], lengths[i], io)
                        backend.sub_inplace(self._sum[i], again)
                    if isinstance(exc, CiphertextError):
                        raise CiphertextError(f"chunk {done}: {exc}") from exc
                    raise CiphertextError(f"chunk {done} could not be added: {exc}") from exc
        self._length = vec.length
        self._count += 1
        self._summands += vec.summands

    def result(self) -> EncryptedVector:
        """The encrypted sum (not seeded: about twice an upload for seeded presets).

        Raises
        ------
        ValueError
            Nothing has been added yet.
        """
        if not self._sum or self._length is None:
            raise ValueError("the accumulator is empty; add at least one upload first")
        with self._backend.io() as io:
            chunks = [self._backend.dump(ct, io) for ct in self._sum]
        return make_vector(
            self._public.fingerprint, self._public.preset, self._length, chunks, self._summands
        )

    def to_bytes(self) -> bytes:
        """:meth:`result` as an envelope blob that institutions can decrypt."""
        return self.result().to_bytes()

    def reset(self) -> None:
        """Drop the sum (e.g. at the start of the next round)."""
        self._sum, self._length, self._count, self._summands = [], None, 0, 0
