"""Server-side HE-FedAvg aggregation: add ciphertexts, never decrypt.

This module owns :class:`Accumulator`, the only thing the server does with ciphertexts. It
needs just a :class:`~flower_focal.crypto.keys.PublicContext` (no secret key), and it never
multiplies or rescales: clients must weight their update before encrypting (``n_i / sum(n)``
or ``n_i / C`` with a public constant ``C``), so the sum *is* the weighted average (or
``C``-scaled) and needs no spare modulus level.

Memory: uploads are added chunk by chunk into the running sum, so the server holds the sum
(one model), the upload's bytes and one decoded chunk at a time.

Parallel: ``Accumulator(public, workers=k)`` with ``k > 1`` spreads the chunks over ``k``
processes (:mod:`~flower_focal.crypto._sumpool`; SEAL holds the GIL, so threads would not
help), each owning a contiguous chunk range of the sum; the result is byte-for-byte the
serial one. Memory then adds one copy of the upload in a RAM-backed scratch file.
"""

from __future__ import annotations

from typing import Any

from flower_focal.crypto._sumpool import SumPool
from flower_focal.crypto.envelope import (
    EncryptedVector,
    EnvelopeLayout,
    chunk_lengths,
    make_vector,
)
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
    workers
        1 (default): add in this process. ``k > 1``: add through ``public.sum_pool(k)``,
        ``k`` processes that each own a contiguous range of chunks (kept by ``public`` across
        accumulators, so a new round's accumulator does not respawn them; the newest
        accumulator that adds claims the pool, and an older one still using it then raises
        ``RuntimeError``). Uploads of a single chunk are added in this process.
    """

    def __init__(self, public: PublicContext, workers: int = 1) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
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
        self._workers = workers
        self._pool: SumPool | None = None  # set while the sum lives in the pool

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
        if self._workers > 1:
            layout = EnvelopeLayout.parse(blob, self._public.fingerprint, preset)
            if len(layout.entries) > 1:
                self._add_pooled(blob, layout)
                return
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

    def _add_pooled(self, blob: bytes | bytearray | memoryview, layout: EnvelopeLayout) -> None:
        if self._length is not None and layout.length != self._length:
            raise CiphertextError(
                f"upload has {layout.length} values but the running sum has {self._length}; all "
                "institutions must encrypt the same flattened model"
            )
        if self._summands + layout.summands >= 2**32:
            raise CiphertextError("too many summands for one accumulator")
        first = self._count == 0
        if first:
            pool = self._public.sum_pool(self._workers)
            pool.claim(self)
        else:
            pool = self._owned_pool()
        lengths = chunk_lengths(layout.length, self._public.preset)
        pool.add(blob, layout.entries, lengths, first)
        self._pool = pool
        self._length = layout.length
        self._count += 1
        self._summands += layout.summands

    def _owned_pool(self) -> SumPool:
        pool = self._pool
        if pool is None or not pool.alive or not pool.owned_by(self):
            raise RuntimeError(
                "this accumulator's sum lived in the context's sum pool, which a newer "
                "Accumulator has claimed (or which was closed); its sum is lost"
            )
        return pool

    def result(self) -> EncryptedVector:
        """The encrypted sum (not seeded: about twice an upload for seeded presets).

        Raises
        ------
        ValueError
            Nothing has been added yet.
        """
        if self._length is None:
            raise ValueError("the accumulator is empty; add at least one upload first")
        if self._pool is not None:
            chunks = self._owned_pool().dump()
        else:
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
        if self._pool is not None and self._pool.alive and self._pool.owned_by(self):
            self._pool.reset()
        self._pool = None
        self._sum, self._length, self._count, self._summands = [], None, 0, 0
