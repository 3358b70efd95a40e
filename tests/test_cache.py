"""The process-wide cache (flower_focal.cache): bounds, LRU eviction, clear, key separation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flower_focal.cache import CACHE, REGIONS, ExactBytes, ProcessCache, Region, region

ROOT = Path(__file__).resolve().parents[1]

SMALL = (Region("count", "entries", 3, "FF_TEST_COUNT", "test"),
         Region("bytes", "MiB", 1, "FF_TEST_MB", "test"))


@pytest.fixture()
def cache(monkeypatch: pytest.MonkeyPatch) -> ProcessCache:
    monkeypatch.delenv("FF_TEST_COUNT", raising=False)
    monkeypatch.delenv("FF_TEST_MB", raising=False)
    return ProcessCache(SMALL)


def test_entry_bound_evicts_the_least_recently_used(cache: ProcessCache) -> None:
    for k in "abc":
        cache.put("count", k, k.upper())
    assert cache.get("count", "a") == "A"  # a is now the most recent
    cache.put("count", "d", "D")
    assert cache.keys("count") == ["c", "a", "d"]  # b went, not a
    s = cache.stats("count")
    assert (s["entries"], s["evictions"], s["hits"], s["unit"], s["limit"], s["bytes"]) == (
        3, 1, 1, "entries", 3, None)
    assert cache.get("count", "b") is None and cache.stats("count")["misses"] == 1


def test_byte_bound_counts_what_values_hold_and_keeps_the_newest(
        cache: ProcessCache, monkeypatch: pytest.MonkeyPatch) -> None:
    mib = 2**20
    cache.put("bytes", 1, "one", nbytes=mib // 2)
    cache.put("bytes", 2, "two", nbytes=mib // 2)
    assert cache.keys("bytes") == [1, 2] and cache.stats("bytes")["bytes"] == mib
    cache.put("bytes", 3, "three", nbytes=mib // 4)
    assert cache.keys("bytes") == [2, 3] and cache.stats("bytes")["bytes"] == 3 * mib // 4
    cache.put("bytes", 4, "big", nbytes=5 * mib)  # over the whole budget: kept alone
    assert cache.keys("bytes") == [4]
    monkeypatch.setenv("FF_TEST_MB", "0")  # no budget: the newest still stays
    cache.put("bytes", 5, "five", nbytes=1)
    assert cache.keys("bytes") == [5] and cache.stats("bytes")["evictions"] == 4
    with pytest.raises(ValueError, match="nbytes"):
        cache.put("bytes", 6, "unsized")


def test_keep_holds_the_most_recent_entries_whatever_the_budget(
        cache: ProcessCache, monkeypatch: pytest.MonkeyPatch) -> None:
    # he-fedavg with server momentum asks for the current and the previous global every time
    monkeypatch.setenv("FF_TEST_MB", "0")
    cache.put("bytes", "prev", "P", nbytes=10)
    cache.put("bytes", "cur", "C", nbytes=10, keep=2)
    assert cache.keys("bytes") == ["prev", "cur"]
    assert cache.get_or_build("bytes", "prev", lambda: "rebuilt", nbytes=len, keep=2) == "P"
    cache.put("bytes", "next", "N", nbytes=10, keep=2)  # a third: the oldest goes
    assert cache.keys("bytes") == ["prev", "next"]
    cache.put("bytes", "alone", "A", nbytes=10)  # keep=1 (default): the budget applies again
    assert cache.keys("bytes") == ["alone"]


def test_a_malformed_bound_fails_before_building_and_names_the_variable(
        cache: ProcessCache, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    monkeypatch.setenv("FF_TEST_MB", "lots")
    with pytest.raises(ValueError, match="FF_TEST_MB='lots'"):
        cache.get_or_build("bytes", "k", lambda: built.append(1), nbytes=lambda _: 0)
    assert built == [] and cache.stats("bytes")["misses"] == 0
    monkeypatch.setenv("FF_TEST_MB", "nan")
    with pytest.raises(ValueError, match="FF_TEST_MB"):
        cache.get_or_build("bytes", "k", lambda: built.append(1), nbytes=lambda _: 0)


def test_get_or_build_builds_once_and_stores_nothing_when_the_build_fails(cache: ProcessCache) -> None:
    calls = []

    def build() -> list[int]:
        calls.append(1)
        return [len(calls)]

    first = cache.get_or_build("count", ("k", 1), build)
    assert cache.get_or_build("count", ("k", 1), build) is first and calls == [1]

    def broken() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_build("count", "bad", broken)
    assert "bad" not in cache.keys("count")
    s = cache.stats("count")
    assert (s["hits"], s["misses"]) == (1, 2)


def test_keys_are_separate_per_region(cache: ProcessCache) -> None:
    cache.put("count", "same", "in count")
    cache.put("bytes", "same", "in bytes", nbytes=1)
    assert cache.get("count", "same") == "in count" and cache.get("bytes", "same") == "in bytes"
    assert cache.get_or_build("count", ("same", 2), lambda: "other key") == "other key"
    assert cache.get("count", "same") == "in count"
    with pytest.raises(KeyError, match="no cache region 'nosuch'"):
        cache.get("nosuch", "same")


def test_clear_one_region_or_all(cache: ProcessCache) -> None:
    cache.put("count", 1, 1)
    cache.put("bytes", 1, 1, nbytes=10)
    cache.get("count", 1)
    cache.clear("count")
    assert cache.stats("count") == {"entries": 0, "bytes": None, "limit": 3, "unit": "entries",
                                    "hits": 0, "misses": 0, "evictions": 0}
    assert cache.keys("bytes") == [1]
    cache.clear()
    assert cache.stats()["bytes"]["entries"] == 0 and cache.stats()["bytes"]["bytes"] == 0


def test_configure_overrides_the_variable_and_applies_at_once(
        cache: ProcessCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FF_TEST_COUNT", "10")
    for k in range(5):
        cache.put("count", k, k)
    cache.configure("count", 2)
    assert cache.keys("count") == [3, 4] and cache.stats("count")["limit"] == 2
    cache.configure("count", None)  # back to the variable
    assert cache.stats("count")["limit"] == 10
    with pytest.raises(ValueError, match=">= 0"):
        cache.configure("count", -1)


def test_exact_bytes_keys_compare_every_byte() -> None:
    a = bytes(1000)
    b = bytearray(a)
    b[500] = 1  # same length, same ends: same cheap hash, different key
    assert hash(ExactBytes(a)) == hash(ExactBytes(bytes(b)))
    assert ExactBytes(a) != ExactBytes(bytes(b)) and ExactBytes(a) == ExactBytes(bytes(1000))
    cache = ProcessCache(SMALL)
    cache.put("count", ExactBytes(a), "zeros")
    assert cache.get("count", ExactBytes(bytes(b))) is None
    assert cache.get("count", ExactBytes(bytes(1000))) == "zeros"


def test_every_region_has_a_distinct_variable_and_a_valid_default() -> None:
    names = [r.name for r in REGIONS]
    assert len(set(names)) == len(names) and len({r.env for r in REGIONS}) == len(REGIONS)
    assert region("institutions").env == "FLOWER_FOCAL_DATA_CACHE_MB"  # the variable users set
    assert set(CACHE.stats()) == set(names)
    for r in REGIONS:
        assert r.env.startswith("FLOWER_FOCAL_") and r.env.endswith("_MB" if r.unit == "MiB" else "_ENTRIES")
        assert r.default >= 0


def test_data_regions_hold_what_load_institution_built(monkeypatch: pytest.MonkeyPatch) -> None:
    from flower_focal.config import RunConfig
    from flower_focal.data import clear_caches, load_institution
    from flower_focal.data.institution import dataset_nbytes

    monkeypatch.setenv("FLOWER_FOCAL_DATA_STORE", "off")
    clear_caches()
    cfg = RunConfig(dataset="synthetic-retina", num_samples=40, image_size=16, partitioner="iid")
    a, b = load_institution(cfg, 0, 2), load_institution(cfg, 1, 2)
    s = CACHE.stats("institutions")
    assert s["entries"] == 2 and s["misses"] == 2
    assert s["bytes"] == sum(dataset_nbytes(i.train) + dataset_nbytes(i.val) for i in (a, b)) > 0
    assert CACHE.stats("sources")["entries"] == 1 and CACHE.stats("partitions")["entries"] == 1
    clear_caches()
    assert all(CACHE.stats(r)["entries"] == 0 for r in ("institutions", "sources", "partitions"))


def test_npz_region_is_keyed_by_path_and_mtime(tmp_path: Path) -> None:
    import os

    from flower_focal.data.sources import read_npz

    CACHE.clear("npz")
    path = tmp_path / "x.npz"
    np.savez(path, a=np.arange(4))
    first = read_npz(path)
    assert read_npz(path) is first and CACHE.stats("npz")["bytes"] == first["a"].nbytes
    np.savez(path, a=np.arange(5))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert len(read_npz(path)["a"]) == 5 and CACHE.stats("npz")["misses"] == 2
    CACHE.clear("npz")


def test_the_cache_and_the_focal_step_path_import_without_torch() -> None:
    code = ("import sys, flower_focal.cache, clients.client_app, flower_focal.client.focal; "
            "print('torch' in sys.modules, 'monai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]


def test_an_infinite_bound_is_refused_with_its_name(cache: ProcessCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FF_TEST_MB", "inf")
    with pytest.raises(ValueError, match="FF_TEST_MB='inf' is not a finite number"):
        cache.put("bytes", 1, "one", nbytes=1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        cache.configure("count", float("inf"))
    cache.put("count", "a", "A")  # the region still works: the bad bound was not stored
    assert cache.keys("count") == ["a"]
