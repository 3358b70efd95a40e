"""The server's FOCAL state, sharded by class pair, in this process or in worker processes.

This module owns where the server's ciphertexts live and the two server loops (forward and
backward + update). A :class:`Shard` holds every institution's embeddings and the head
ciphertexts of *its* class pairs, so the forward result and the backward update of a pair
need nothing from another shard: the main process only routes serialized ciphertexts.
With ``workers == 1`` one in-process shard owns all pairs; with ``k > 1`` up to
``min(k, n_pairs)`` spawned processes each own the pairs ``p = w (mod k)``.

The arithmetic object (``ev``) is either :class:`flower_focal.crypto.ckks.CkksEvaluator`
or the numpy twin :class:`flower_focal.testing.plaintext.PlainEvaluator`; the loops below are
the same for both.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flower_focal.focal.errors import InstitutionUploadError
from flower_focal.focal.packing import FocalLayout

Raw = Any  # a serialized ciphertext (bytes) or, for the twin, a numpy slot vector


class Shard:
    """Server state and loops for a subset of class pairs (see the module docstring)."""

    def __init__(
        self, ev: Any, layout: FocalLayout, pairs: Sequence[int], head_raw: Sequence[Raw]
    ) -> None:
        self.ev, self.layout, self.pairs = ev, layout, list(pairs)
        plan = ev.plan
        g, lp = layout.n_groups, len(self.pairs)
        if len(head_raw) != g * lp:
            raise ValueError(f"shard needs {g * lp} head ciphertexts, got {len(head_raw)}")
        cts = ev.load_many(head_raw, plan.w_level, plan.w_scale)
        self.w = [cts[i * lp : (i + 1) * lp] for i in range(g)]  # [group][local pair]
        self.x1: dict[str, list[list[Any]]] = {}  # [chunk][group], level of X uploads
        self.x0: dict[str, list[list[Any]]] = {}  # the same, mod-switched to W's level
        self.v0: dict[str, list[list[Any]]] = {}  # validation X, W's level only (forward only)
        self._staged: dict[str, list[list[Any]]] | None = None
        steps = layout.lane_sum_steps()
        missing = sorted(set(steps) - set(ev.rotation_steps))
        if missing:
            raise ValueError(
                f"block {layout.block} needs rotations by {list(steps)}; the keys lack {missing} "
                "(pick a block the preset's galois_steps support)"
            )
        self._saved: list[Raw] = []
        self.snapshot()  # the head it starts from (initial or resumed) is the first rollback point

    def add_x(self, inst: str, raw: Sequence[Raw]) -> None:
        """Register an institution's embedding ciphertexts (``[chunk][group]`` order)."""
        plan, g = self.ev.plan, self.layout.n_groups
        cts = self.ev.load_many(raw, plan.x_level, plan.x_scale)
        rows = [cts[i * g : (i + 1) * g] for i in range(len(cts) // g)]
        self.x1[inst] = rows
        self.x0[inst] = [[self.ev.mod_switch(ct) for ct in row] for row in rows]

    def add_val(self, inst: str, raw: Sequence[Raw]) -> None:
        """Register an institution's validation embedding ciphertexts (``[chunk][group]``);
        only the copy at W's level is kept: they are never in a backward pass."""
        plan, g = self.ev.plan, self.layout.n_groups
        cts = self.ev.load_many(raw, plan.x_level, plan.x_scale)
        self.v0[inst] = [[self.ev.mod_switch(ct) for ct in cts[i * g : (i + 1) * g]]
                         for i in range(len(cts) // g)]

    def forward(self, inst: str, validation: bool = False) -> list[Raw]:
        """``sum_g X0[c,g] * W[g,p]`` per (chunk, local pair), relinearised once each
        (``validation``: on the institution's validation embeddings)."""
        ev, out = self.ev, []
        for row in (self.v0 if validation else self.x0)[inst]:
            for lp in range(len(self.pairs)):
                acc = ev.multiply(row[0], self.w[0][lp])
                for g in range(1, len(row)):
                    acc = ev.add_inplace(acc, ev.multiply(row[g], self.w[g][lp]))
                out.append(ev.relinearize_inplace(acc))
        return ev.dump_raw(out)

    def stage(self, errors: Mapping[str, Sequence[Raw]]) -> None:
        """Load and check this step's error ciphertexts (``[chunk][local pair]``); no update."""
        plan, lp = self.ev.plan, len(self.pairs)
        staged: dict[str, list[list[Any]]] = {}
        for inst, raw in errors.items():
            try:
                cts = self.ev.load_many(raw, plan.e_level, plan.e_scale)
            except ValueError as exc:
                raise InstitutionUploadError(inst, str(exc)) from exc
            staged[inst] = [cts[i * lp : (i + 1) * lp] for i in range(len(cts) // lp)]
        self._staged = staged

    def discard(self) -> None:
        """Forget staged errors."""
        self._staged = None

    def commit(self) -> None:
        """``W[g,p] += lane_sum(sum_{inst,chunk} X[c,g] * E[c,p])`` for the staged errors."""
        if self._staged is None:
            raise RuntimeError("commit() without a successful stage()")
        staged, self._staged = self._staged, None
        if not staged:
            return
        ev, plan, steps = self.ev, self.ev.plan, self.layout.lane_sum_steps()
        for g in range(self.layout.n_groups):
            for lp in range(len(self.pairs)):
                acc = None
                for inst, err in staged.items():
                    for c, x_row in enumerate(self.x1[inst]):
                        prod = ev.multiply(x_row[g], err[c][lp])
                        acc = prod if acc is None else ev.add_inplace(acc, prod)
                acc = ev.relinearize_inplace(acc)  # lazily: once per head ciphertext
                for step in steps:  # lane sum at level 1: q1 divides the key-switch noise
                    acc = ev.add_inplace(acc, ev.rotate(acc, step))
                acc = ev.rescale_inplace(acc, plan.w_scale)  # level 1 -> W's level and scale
                self.w[g][lp] = ev.add_inplace(self.w[g][lp], acc)

    def snapshot(self) -> None:
        """Keep a serialized copy of this shard's head ciphertexts (updates are in place)."""
        self._saved = self.ev.dump_raw([ct for row in self.w for ct in row])

    def restore(self) -> None:
        """Back to the last :meth:`snapshot` (the head the shard was made with, before any)."""
        plan, lp = self.ev.plan, len(self.pairs)
        cts = self.ev.load_many(self._saved, plan.w_level, plan.w_scale)
        self.w = [cts[i * lp : (i + 1) * lp] for i in range(self.layout.n_groups)]

    def head(self) -> list[Raw]:
        """Head ciphertexts ``[group][local pair]``."""
        return self.ev.dump_raw([ct for row in self.w for ct in row])


# ------------------------------------------------------------------------- shard handles
class LocalShard:
    """A shard in this process; ``send``/``recv`` mimic :class:`ProcessShard`."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self._result: tuple[str, Any] | None = None

    def send(self, cmd: str, *args: Any) -> None:
        try:
            self._result = ("ok", getattr(self.shard, cmd)(*args))
        except Exception as exc:  # re-raised by recv, like a worker's
            self._result = ("err", exc)

    def recv(self) -> Any:
        if self._result is None:
            raise RuntimeError("recv() without send()")
        status, value = self._result
        self._result = None
        if status == "err":
            raise value
        return value

    def close(self) -> None:
        pass


def _worker_main(conn: Any, factory: Callable[[], Any], layout_params: dict[str, int],
                 pairs: list[int], head_raw: list[Raw]) -> None:
    try:
        shard = Shard(factory(), FocalLayout(**layout_params), pairs, head_raw)
        conn.send(("ok", None))
    except Exception as exc:
        conn.send(("err", exc))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            return
        cmd, args = msg
        try:
            conn.send(("ok", getattr(shard, cmd)(*args)))
        except Exception as exc:
            conn.send(("err", exc))


class ProcessShard:
    """A shard in a spawned worker process, driven over a pipe."""

    def __init__(self, factory: Callable[[], Any], layout: FocalLayout, pairs: list[int],
                 head_raw: list[Raw]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_worker_main,
            args=(child, factory, layout.params(), pairs, head_raw),
            daemon=True,
        )
        self._proc.start()
        child.close()
        self.recv()  # construction errors surface here

    def send(self, cmd: str, *args: Any) -> None:
        self._conn.send((cmd, args))

    def recv(self) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError as exc:
            raise RuntimeError(
                "a FOCAL server worker died; scripts using workers > 1 must guard their entry "
                "point with `if __name__ == '__main__':`"
            ) from exc
        if status == "err":
            raise value
        return value

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.terminate()
        self._conn.close()
