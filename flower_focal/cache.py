"""Every large thing this process keeps in memory between messages, in one place: :data:`CACHE`.

A Flower simulation worker serves many institutions round after round, and a deployed
SuperNode's process may handle many messages; what they keep (datasets, embeddings, frozen
backbones, key holders, the last decrypted aggregate) lives in named *regions* of one
process-wide LRU cache instead of module dictionaries. Each region has a bound, either bytes
(what its values hold) or entries, read from an environment variable at every store (so a test
or notebook can change it) or set with :meth:`ProcessCache.configure`; beyond it the least
recently used entries are dropped. The entry just stored is always kept, even over the bound
(a budget of 0 keeps the newest one only). :data:`REGIONS` lists every region, its bound and
its variable; the README's "Memory kept per process" table is rendered from it.

    from flower_focal.cache import CACHE
    CACHE.stats()                  # {"institutions": {"entries": 3, "bytes": ..., ...}, ...}
    CACHE.clear()                  # forget everything (tests, notebooks); CACHE.clear("embeddings")
    CACHE.configure("embeddings", 256)   # MiB for byte regions, a count for entry regions

Keys are explicit and local to a region (the same key in two regions names two entries).
Values are shared, not copied: callers must not modify what they get. Two threads that miss
the same key at once may both build it (as with :func:`functools.lru_cache`); the later store
wins. This module imports nothing beyond the standard library, so the FOCAL step path (numpy
only, no torch) may use it.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

V = TypeVar("V")

_MISSING = object()


@dataclass(frozen=True)
class Region:
    """One region: its name, what bounds it, the default bound and the variable overriding it."""

    name: str
    unit: Literal["MiB", "entries"]
    default: float
    env: str
    holds: str  # what it holds, for the README table

    def limit(self) -> int:
        """The bound now: bytes for ``MiB`` regions, a count for ``entries`` regions.

        Raises ``ValueError`` naming the variable when it is set to something else than a number.
        """
        raw = os.environ.get(self.env, "").strip()
        try:
            value = float(raw) if raw else float(self.default)
        except ValueError:
            unit = "a number of MiB" if self.unit == "MiB" else "a number of entries"
            raise ValueError(f"{self.env}={raw!r} is not {unit}") from None
        if not math.isfinite(value):
            raise ValueError(f"{self.env}={raw!r} is not a finite number (a large one means: no practical bound)")
        value = max(value, 0.0)
        return int(value * 2**20) if self.unit == "MiB" else int(value)


REGIONS: tuple[Region, ...] = (
    Region("institutions", "MiB", 2048, "FLOWER_FOCAL_DATA_CACHE_MB",
           "an institution's built train/val datasets (transformed image tensors)"),
    Region("splits", "entries", 4, "FLOWER_FOCAL_SPLIT_CACHE_ENTRIES",
           "whole unpartitioned splits for central evaluation (`load_split`)"),
    Region("sources", "entries", 4, "FLOWER_FOCAL_SOURCE_CACHE_ENTRIES",
           "a data source's item lists and labels (`load_source`)"),
    Region("partitions", "entries", 16, "FLOWER_FOCAL_PARTITION_CACHE_ENTRIES",
           "the index arrays of a partition"),
    Region("npz", "entries", 4, "FLOWER_FOCAL_NPZ_CACHE_ENTRIES",
           "the arrays of a `.npz` file, keyed by path and mtime"),
    Region("embeddings", "MiB", 1024, "FLOWER_FOCAL_EMBEDDING_CACHE_MB",
           "FOCAL: an institution's frozen-backbone embeddings (also cached on disk)"),
    Region("backbones", "entries", 2, "FLOWER_FOCAL_BACKBONE_CACHE_ENTRIES",
           "FOCAL: frozen backbones, per (name, weights, input size, device, precision)"),
    Region("key-holders", "entries", 4, "FLOWER_FOCAL_KEY_HOLDER_CACHE_ENTRIES",
           "FOCAL: CKKS encryptor/decryptor per key fingerprint"),
    Region("secret-keys", "entries", 4, "FLOWER_FOCAL_SECRET_KEY_CACHE_ENTRIES",
           "loaded HE secret contexts, per key file path and mtime"),
    Region("decrypted", "MiB", 0, "FLOWER_FOCAL_DECRYPT_CACHE_MB",
           "HE-FedAvg: the decrypted global model and the ciphertext it came from "
           "(0: the latest one only; the latest two once he-fedavg's server momentum asks for the "
           "previous global too)"),
)
"""Every region of :data:`CACHE`."""


def region(name: str) -> Region:
    """The :class:`Region` called ``name`` (``KeyError`` listing the regions otherwise)."""
    for r in REGIONS:
        if r.name == name:
            return r
    raise KeyError(f"no cache region {name!r}; regions: {sorted(r.name for r in REGIONS)}")


class _Store:
    """One region's entries (oldest first) and counters."""

    def __init__(self, region: Region) -> None:
        self.region = region
        # a plain dict in use order (oldest first; a used entry is popped and re-inserted):
        # OrderedDict compares a key more than once per lookup, and a key may be a 150 MB blob
        self.entries: dict[Hashable, tuple[Any, int | None]] = {}
        self.override: float | None = None
        self.hits = self.misses = self.evictions = 0

    def limit(self) -> int:
        if self.override is None:
            return self.region.limit()
        return int(self.override * 2**20) if self.region.unit == "MiB" else int(self.override)

    def nbytes(self) -> int:
        return sum(n or 0 for _, n in self.entries.values())

    def reset(self) -> None:
        self.entries.clear()
        self.hits = self.misses = self.evictions = 0


class ProcessCache:
    """A process-wide LRU cache with named, separately bounded regions (see the module doc)."""

    def __init__(self, regions: tuple[Region, ...] = REGIONS) -> None:
        self._lock = threading.RLock()
        self._stores = {r.name: _Store(r) for r in regions}

    # ------------------------------------------------------------------ lookups and stores
    def _store(self, region: str) -> _Store:
        try:
            return self._stores[region]
        except KeyError:
            raise KeyError(f"no cache region {region!r}; regions: {sorted(self._stores)}") from None

    def get(self, region: str, key: Hashable, default: Any = None) -> Any:
        """The value stored under ``key`` (now the most recently used), or ``default``; counts a
        hit or a miss."""
        store = self._store(region)
        with self._lock:
            found = self._lookup(store, key)
            if found is _MISSING:
                store.misses += 1
                return default
            return found

    @staticmethod
    def _lookup(store: _Store, key: Hashable) -> Any:
        found = store.entries.pop(key, _MISSING)
        if found is _MISSING:
            return _MISSING
        store.entries[key] = found
        store.hits += 1
        return found[0]

    def put(self, region: str, key: Hashable, value: Any, *, nbytes: int | None = None,
            keep: int = 1) -> Any:
        """Store ``value`` under ``key`` (``nbytes``: what it holds; required in a ``MiB``
        region) and drop least recently used entries beyond the region's bound, but never the
        ``keep`` most recent ones (a caller that asks for two entries in turn, every time, says
        ``keep=2``). Returns ``value``."""
        store = self._store(region)
        if store.region.unit == "MiB" and nbytes is None:
            raise ValueError(f"cache region {region!r} is bounded by bytes: put() needs nbytes")
        limit = store.limit()
        with self._lock:
            store.entries.pop(key, None)  # re-inserted last: the most recently used
            store.entries[key] = (value, None if nbytes is None else int(nbytes))
            self._evict(store, limit, keep)
        return value

    def get_or_build(self, region: str, key: Hashable, build: Callable[[], V], *,
                     nbytes: Callable[[V], int] | None = None, keep: int = 1) -> V:
        """The value under ``key``, or ``build()`` stored under it (``nbytes(value)``: its size;
        ``keep``: as for :meth:`put`).

        The bound is read before building, so a malformed variable fails before any work (and
        counts no miss: ``misses`` is the number of builds started).
        ``build`` runs outside the lock; if it raises, nothing is stored.
        """
        store = self._store(region)
        with self._lock:
            found = self._lookup(store, key)
        if found is not _MISSING:
            return found
        store.limit()  # a malformed bound fails now, not after an expensive build
        with self._lock:
            store.misses += 1
        value = build()
        self.put(region, key, value, nbytes=None if nbytes is None else nbytes(value), keep=keep)
        return value

    def _evict(self, store: _Store, limit: int, keep: int = 1) -> None:
        by_bytes = store.region.unit == "MiB"
        total = store.nbytes() if by_bytes else len(store.entries)
        while len(store.entries) > max(1, keep) and total > limit:
            _, n = store.entries.pop(next(iter(store.entries)))
            total -= (n or 0) if by_bytes else 1
            store.evictions += 1

    # ------------------------------------------------------------------------- management
    def clear(self, region: str | None = None) -> None:
        """Forget every entry (and reset the counters) of ``region``, or of every region."""
        with self._lock:
            for store in ([self._store(region)] if region is not None else self._stores.values()):
                store.reset()

    def configure(self, region: str, limit: float | None) -> None:
        """Set ``region``'s bound (MiB or entries, as :data:`REGIONS` says) for this process,
        overriding its variable; ``None`` goes back to the variable. Applies at once."""
        store = self._store(region)
        if limit is not None and not (limit >= 0 and math.isfinite(limit)):
            raise ValueError(f"cache region {region!r}: bound must be a finite number >= 0, got {limit!r}")
        with self._lock:
            store.override = limit
            if limit is not None:
                self._evict(store, store.limit())

    def keys(self, region: str) -> list[Hashable]:
        """The keys of ``region``, least recently used first."""
        with self._lock:
            return list(self._store(region).entries)

    def stats(self, region: str | None = None) -> dict[str, Any]:
        """Per region: ``entries``, ``bytes`` (``None`` for an entry-bounded region whose values
        report no size), ``limit`` (bytes or entries), ``unit``, ``hits``, ``misses``,
        ``evictions``. With ``region``, that region's dict only."""
        with self._lock:
            out = {}
            for name, store in self._stores.items():
                if region is not None and name != region:
                    continue
                sized = [n for _, n in store.entries.values() if n is not None]
                try:
                    limit: int | None = store.limit()
                except ValueError:
                    limit = None
                out[name] = {
                    "entries": len(store.entries),
                    "bytes": sum(sized) if sized or store.region.unit == "MiB" else None,
                    "limit": limit,
                    "unit": "bytes" if store.region.unit == "MiB" else "entries",
                    "hits": store.hits, "misses": store.misses, "evictions": store.evictions,
                }
            if region is not None:
                self._store(region)
                return out[region]
            return out


def nbytes(value: Any) -> int:
    """Bytes held by ``value``: numpy arrays, torch tensors (MONAI MetaTensors) and dicts, lists
    and tuples of them (anything else: its ``nbytes`` or 0). What byte-bounded regions count."""
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # torch / MetaTensor
        return int(value.element_size() * value.nelement())
    return int(getattr(value, "nbytes", 0))


class ExactBytes:
    """A bytes key compared byte for byte but hashed cheaply (length and both ends).

    For keys that are large blobs (a 150 MB ciphertext): hashing all of it per message would
    cost more than the exact comparison a dict does on a hash match; a collision of the cheap
    hash is only a comparison that fails, never a wrong hit.
    """

    __slots__ = ("_hash", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._hash = hash((len(data), data[:64], data[-64:]))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExactBytes) and (other.data is self.data or other.data == self.data)

    def __repr__(self) -> str:
        return f"ExactBytes({len(self.data)} bytes)"


CACHE = ProcessCache()
"""This process's cache."""

__all__ = ["CACHE", "REGIONS", "ExactBytes", "ProcessCache", "Region", "nbytes", "region"]
