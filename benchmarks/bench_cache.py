"""What a hit of the decrypted-aggregate cache costs (flower_focal.cache, region ``decrypted``).

Each message carries a fresh copy of the ciphertext (``bytes`` built from the message), so a
hit must compare that copy with the cached one. Median seconds per lookup over ``--repeats``,
for a random blob of ``--mb`` MiB (an 11 M-parameter ``compact`` aggregate is about 150 MB):

* ``tuple_eq_s``: the old single-entry cache's check, ``(fp, weights, blob) == cached_key``;
* ``cache_hit_s``: ``CACHE.get("decrypted", (fp, weights, ExactBytes(blob)))`` (what
  ``he_mod`` does now: a cheap hash of length and ends, then an exact comparison);
* ``cache_miss_same_ends_s``: the same lookup for a blob that differs in one middle byte (same
  length and ends: the cheap hash collides, the comparison refuses);
* ``full_hash_s``: ``hash(blob)`` of a fresh copy, what a plain ``bytes`` dict key would cost.

Prints one JSON object. ``python benchmarks/bench_cache.py --mb 150 --repeats 7``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _common import emit, loadavg

from flower_focal.cache import ExactBytes, ProcessCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=150.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    result: dict[str, object] = {"loadavg_before": loadavg(), "mb": args.mb, "repeats": args.repeats}
    blob = os.urandom(int(args.mb * 2**20))
    fresh = bytes(bytearray(blob))  # an equal copy (another object)
    changed = bytearray(blob)
    changed[len(changed) // 2] ^= 1
    changed_b = bytes(changed)
    fp, weights = b"f" * 32, b"w" * 16

    old_key = (fp, weights, blob)
    cache = ProcessCache()
    cache.put("decrypted", (fp, weights, ExactBytes(blob)), "plaintext", nbytes=len(blob))
    assert cache.get("decrypted", (fp, weights, ExactBytes(fresh))) == "plaintext"
    assert cache.get("decrypted", (fp, weights, ExactBytes(changed_b))) is None
    times: dict[str, list[float]] = {name: [] for name in
                                     ("tuple_eq_s", "cache_hit_s", "cache_miss_same_ends_s", "full_hash_s")}

    def timed(name: str, fn, *args) -> None:
        t = time.perf_counter()
        fn(*args)
        times[name].append(time.perf_counter() - t)

    def hit(copy: bytes) -> object:
        return cache.get("decrypted", (fp, weights, ExactBytes(copy)))

    for i in range(args.repeats):  # interleaved (a load spike hits every case alike), and the
        copy = bytes(bytearray(blob))  # first compare after the copy alternates (it runs slower)
        pair = [("cache_hit_s", hit, copy), ("tuple_eq_s", old_key.__eq__, (fp, weights, copy))]
        for name, fn, arg in pair[:: 1 if i % 2 else -1]:
            timed(name, fn, arg)
        timed("cache_miss_same_ends_s", hit, changed_b)
        timed("full_hash_s", hash, copy)  # bytes caches its hash: the first hash of this object
        del copy
    for name, values in times.items():
        result[name] = round(statistics.median(values), 5)
    result["loadavg_after"] = loadavg()
    emit(result)


if __name__ == "__main__":
    main()
