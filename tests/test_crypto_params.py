"""HE presets: the registry is valid and insecure/inconsistent parameter sets are refused."""

from __future__ import annotations

import dataclasses

import pytest

from flower_focal.crypto import MAX_COEFF_BITS_128, PRESETS, HEPreset, get_preset
from flower_focal.crypto.backends import BACKENDS
from flower_focal.crypto.params import BACKEND_SCHEMES


def _ckks(**overrides: object) -> HEPreset:
    base = HEPreset(
        name="test-ckks",
        backend="tenseal-ckks",
        wire_id=200,
        poly_modulus_degree=4096,
        coeff_mod_bit_sizes=(44, 60),
        scale_bits=34,
    )
    return dataclasses.replace(base, **overrides)


def test_registry_presets_are_valid_and_unique() -> None:
    assert set(PRESETS) == {"compact", "ckks", "bfv", "nvflare"}
    assert len({p.wire_id for p in PRESETS.values()}) == len(PRESETS)
    for preset in PRESETS.values():
        assert preset.validate() is preset
        assert preset.total_coeff_bits <= MAX_COEFF_BITS_128[preset.poly_modulus_degree]
        assert HEPreset.from_params(preset.params()) == preset


def test_every_backend_name_has_an_implementation() -> None:
    assert set(BACKENDS) == set(BACKEND_SCHEMES)


def test_preset_shapes() -> None:
    compact = PRESETS["compact"]
    assert compact.coeff_mod_bit_sizes == (52,) and compact.scale_bits == 36
    assert compact.values_per_chunk == 4096  # 2048 complex slots x 2 reals
    assert PRESETS["ckks"].values_per_chunk == 2048
    assert PRESETS["bfv"].values_per_chunk == 4096
    assert PRESETS["nvflare"].values_per_chunk == 4096
    # Ranges of the unweighted model: ImageNet-pretrained EfficientNet-Lite0's BatchNorm running
    # variances reach 566 (test_he_fedavg encrypts the packaged weights under the default).
    assert compact.max_abs_value == 8192.0
    assert PRESETS["bfv"].max_abs_value == 4095.0
    assert PRESETS["ckks"].max_abs_value == 8192.0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"coeff_mod_bit_sizes": (60, 60)}, "128-bit security"),  # 120 bits at N=4096
        ({"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": (60, 60, 60, 40)}, "128-bit"),
        ({"poly_modulus_degree": 3000}, "power of two"),
        ({"poly_modulus_degree": 65536}, "power of two"),
        ({"poly_modulus_degree": 512}, "power of two"),
        ({"scale_bits": 44}, "below the first prime"),
        ({"scale_bits": 50}, "below the first prime"),
        ({"scale_bits": 38}, "headroom"),
        ({"scale_bits": 10}, "scale_bits"),
        ({"scale_bits": None}, "scale_bits"),
        ({"coeff_mod_bit_sizes": (46,)}, "at least two primes"),
        ({"coeff_mod_bit_sizes": ()}, "non-empty"),
        ({"coeff_mod_bit_sizes": (44, 61)}, "20..60 bits"),
        ({"coeff_mod_bit_sizes": (44, 30, 30)}, "intermediate primes"),
        ({"complex_packing": True}, "seal-ckks"),
        ({"seeded": True}, "seal-ckks"),
        ({"plain_modulus_bits": 30}, "BFV-only"),
        ({"backend": "paillier"}, "unknown backend"),
        ({"wire_id": 0}, "wire_id"),
        ({"name": "Bad Name"}, "name"),
        ({"eval_keys": ("bootstrap",)}, "eval_keys"),
        ({"eval_keys": ("relin", "relin")}, "twice"),
    ],
)
def test_insecure_or_inconsistent_ckks_refused(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _ckks(**overrides).validate()


def test_single_prime_seal_preset_cannot_carry_eval_keys() -> None:
    bad = dataclasses.replace(PRESETS["compact"], name="x", wire_id=201, eval_keys=("relin",))
    with pytest.raises(ValueError, match="key switching"):
        bad.validate()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"plain_modulus_bits": 40}, "over the plain modulus"),  # eats the noise budget
        ({"plain_modulus_bits": 39}, "over the plain modulus"),  # 11 bits: one short
        ({"plain_modulus_bits": 10}, "plain_modulus_bits"),
        ({"fixed_point_bits": 36}, "fixed_point_bits"),  # > plain_modulus_bits - 3
        ({"fixed_point_bits": None}, "fixed_point_bits"),
        ({"scale_bits": 30}, "CKKS-only"),
    ],
)
def test_inconsistent_bfv_refused(overrides: dict, match: str) -> None:
    bad = dataclasses.replace(PRESETS["bfv"], name="x", wire_id=202, **overrides)
    with pytest.raises(ValueError, match=match):
        bad.validate()


def test_get_preset() -> None:
    assert get_preset("compact") is PRESETS["compact"]
    with pytest.raises(ValueError, match="compact"):
        get_preset("nope")
    with pytest.raises(ValueError, match="registered with different parameters"):
        get_preset(dataclasses.replace(PRESETS["ckks"], scale_bits=33))
    with pytest.raises(ValueError, match="unknown fields"):
        HEPreset.from_params({**PRESETS["ckks"].params(), "secret": 1})


def test_keygen_refuses_insecure_preset(tmp_path) -> None:
    from flower_focal.crypto import keygen

    insecure = _ckks(coeff_mod_bit_sizes=(60, 60))  # 120 bits > 109 allowed at N=4096
    with pytest.raises(ValueError, match="128-bit security"):
        keygen(tmp_path, insecure)
    assert not list(tmp_path.iterdir())


def test_only_the_crypto_package_imports_tenseal() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"^\s*(import|from)\s+tenseal\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(root))
        for folder in ("flower_focal", "strategies", "clients", "simulations", "tests", "benchmarks")
        for path in (root / folder).rglob("*.py")
        if "crypto" not in path.relative_to(root).parts[:2] and pattern.search(path.read_text())
    ]
    assert offenders == [], f"tenseal imported outside flower_focal/crypto: {offenders}"
