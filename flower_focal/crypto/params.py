"""Homomorphic-encryption parameter presets and their security/consistency rules.

This module owns *what* gets encrypted with which parameters: the frozen :class:`HEPreset`
records, the closed :data:`PRESETS` registry and :meth:`HEPreset.validate`, which refuses any
parameter set that is below 128-bit classical security (HomomorphicEncryption.org standard) or
that is numerically inconsistent (scale above the first prime, too little headroom, a BFV
plain modulus that eats the noise budget, ...). It imports no HE library, so it is cheap to
import anywhere (configs, CLIs, docs).

Callers pick a preset by name (``get_preset("compact")``); they never build TenSEAL or SEAL
objects themselves. Adding a preset means adding one :class:`HEPreset` to :data:`PRESETS`;
:func:`flower_focal.crypto.keys.keygen` and the backends pick it up with no other change.
A preset that needs server-side multiply/rotate (FOCAL) lists the public evaluation keys in
``eval_keys`` and the key layer ships exactly those keys to the server, nothing else.

Value bounds
------------
Every preset has a :attr:`HEPreset.max_abs_value`: the largest ``|value|`` that may appear in
any plaintext **and in the decrypted sum**. Encryption refuses inputs above it, but the server
cannot check a sum, so callers must keep ``|sum of uploads| <= max_abs_value``. With FedAvg
weighting done on the client (``w_i = n_i / sum(n)``, weights summing to 1) this holds
automatically when every unweighted update satisfies ``|x_i| <= max_abs_value``, because
``|sum_i w_i x_i| <= max_i |x_i|``. Exceeding it wraps around modulo the ciphertext (CKKS) or
plain (BFV) modulus and decrypts to garbage without any error.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

#: Largest total coefficient-modulus size (bits) for 128-bit classical security with a
#: ternary secret, per poly modulus degree N (HomomorphicEncryption.org security standard,
#: the same table SEAL enforces for ``sec_level_type.tc128``).
MAX_COEFF_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

#: Backend name -> HE scheme. The implementations live in ``flower_focal.crypto.backends``.
BACKEND_SCHEMES: dict[str, str] = {
    "seal-ckks": "ckks",  # tenseal.sealapi (raw SEAL): 1 prime, seeded, complex packing
    "tenseal-ckks": "ckks",
    "tenseal-bfv": "bfv",
}

#: Public evaluation keys a preset may ask the key layer to give the server.
EVAL_KEY_KINDS: frozenset[str] = frozenset({"relin", "galois"})

MIN_HEADROOM_BITS = 8  # q0 - scale: room for the summed value plus noise in CKKS
MIN_SCALE_BITS = 20  # below this CKKS precision is useless for model weights
MIN_PRIME_BITS = 20
MAX_PRIME_BITS = 60  # SEAL's limit per prime
MIN_BFV_NOISE_BITS = 12  # data-modulus bits minus plain-modulus bits: fresh noise + 1000 adds (measured)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class HEPreset:
    """One complete, validated set of HE parameters.

    Parameters
    ----------
    name
        Registry key (lower-case, ``[a-z0-9_-]``).
    backend
        One of :data:`BACKEND_SCHEMES`: ``"seal-ckks"`` (low-level ``tenseal.sealapi``),
        ``"tenseal-ckks"`` or ``"tenseal-bfv"``.
    wire_id
        1..255, written into every ciphertext blob so a blob made under another preset is
        rejected before it reaches SEAL. Unique across :data:`PRESETS`.
    poly_modulus_degree
        Ring dimension N (power of two, 1024..32768).
    coeff_mod_bit_sizes
        Bit sizes of the RNS primes. For TenSEAL backends the last one is SEAL's special
        (key-switching) prime and fresh ciphertexts carry the others; the ``seal-ckks``
        backend may use a single prime (no key switching, no special prime).
    scale_bits
        CKKS only: the encoding scale is ``2**scale_bits``.
    plain_modulus_bits, fixed_point_bits
        BFV only: a batching prime ``t`` of that many bits, and values are quantised as
        ``round(x * 2**fixed_point_bits)``.
    complex_packing
        ``seal-ckks`` only: pack two reals per complex slot (doubles the values per ciphertext).
    seeded
        ``seal-ckks`` only: symmetric encryption whose serialized form replaces the uniform
        polynomial ``c1`` by a PRNG seed (halves the upload; the server's sum is not seeded).
    eval_keys
        Public evaluation keys (``"relin"``, ``"galois"``) the server context must carry. Empty
        for additive-only aggregation; a FOCAL preset lists what its server ops need.
    galois_steps
        ``seal-ckks`` only: the slot-rotation steps (positive = left) the Galois keys are made
        for. Empty with ``"galois"`` in ``eval_keys`` means SEAL's default (every power of two,
        both directions); a FOCAL preset lists exactly the steps its layouts rotate by.
    description
        Free text (not part of the fingerprint).

    Notes
    -----
    All presets use symmetric (secret-key) encryption: institutions share the secret key,
    so no public encryption key is ever created or shipped.
    """

    name: str
    backend: str
    wire_id: int
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int | None = None
    plain_modulus_bits: int | None = None
    fixed_point_bits: int | None = None
    complex_packing: bool = False
    seeded: bool = False
    eval_keys: tuple[str, ...] = ()
    galois_steps: tuple[int, ...] = ()
    description: str = field(default="", compare=False)

    # ------------------------------------------------------------------ derived values
    @property
    def scheme(self) -> str:
        """``"ckks"`` or ``"bfv"``."""
        try:
            return BACKEND_SCHEMES[self.backend]
        except KeyError:
            raise ValueError(
                f"preset {self.name!r}: unknown backend {self.backend!r}; "
                f"choose one of {sorted(BACKEND_SCHEMES)}"
            ) from None

    @property
    def total_coeff_bits(self) -> int:
        """Sum of all prime bit sizes (what the security limit applies to)."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def data_primes(self) -> int:
        """Number of primes in a fresh ciphertext (all but SEAL's special prime, if any)."""
        n = len(self.coeff_mod_bit_sizes)
        return n if n == 1 else n - 1

    @property
    def values_per_chunk(self) -> int:
        """Real values carried by one ciphertext (the chunk size of an encrypted vector)."""
        n = self.poly_modulus_degree
        if self.scheme == "bfv":
            return n
        return n if self.complex_packing else n // 2

    @property
    def scale(self) -> float:
        """CKKS encoding scale (``2**scale_bits``); BFV: the fixed-point factor."""
        bits = self.scale_bits if self.scheme == "ckks" else self.fixed_point_bits
        if bits is None:
            raise ValueError(f"preset {self.name!r} has no scale")
        return float(2**bits)

    @property
    def max_abs_value(self) -> float:
        """Largest ``|value|`` allowed in a plaintext and in the decrypted sum.

        CKKS: the first prime ``q0 >= 2**(b0-1)`` must hold ``|coefficient| < q0/2``; a
        coefficient is at most ``scale * max|slot|`` and complex packing makes
        ``|slot| <= sqrt(2) * max|x|``, so ``2**(b0 - scale_bits - 3)`` keeps a safety bit
        for noise.
        BFV: ``t >= 2**(t_bits-1)`` and decryption is centred, so
        ``|round(sum * 2**f)| < 2**(t_bits-2)``; ``2**(t_bits-2-f) - 1`` leaves room for the
        rounding of up to ``2**(f+1)`` summands.
        """
        if self.scheme == "bfv":
            t, f = self.plain_modulus_bits, self.fixed_point_bits
            if t is None or f is None:
                self._fail("BFV needs plain_modulus_bits and fixed_point_bits")
            return float(2 ** (t - 2 - f) - 1)
        if self.scale_bits is None:
            self._fail("CKKS needs scale_bits")
        return float(2 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 3))

    # ------------------------------------------------------------------ (de)serialization
    def params(self) -> dict[str, Any]:
        """The parameters as plain JSON types (what manifests and fingerprints record)."""
        d = asdict(self)
        d.pop("description")
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        d["eval_keys"] = list(self.eval_keys)
        if self.galois_steps:
            d["galois_steps"] = list(self.galois_steps)
        else:  # omitted when empty so fingerprints of pre-FOCAL key sets do not change
            d.pop("galois_steps")
        return d

    def canonical_bytes(self) -> bytes:
        """Deterministic encoding of :meth:`params` (sorted keys, no whitespace)."""
        return json.dumps(self.params(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> HEPreset:
        """Rebuild and validate a preset from :meth:`params` output.

        Raises
        ------
        ValueError
            Unknown/missing fields or parameters that fail :meth:`validate`.
        """
        known = {f for f in cls.__dataclass_fields__ if f != "description"}
        extra = set(params) - known
        missing = {"name", "backend", "wire_id", "poly_modulus_degree", "coeff_mod_bit_sizes"}
        missing -= set(params)
        if extra or missing:
            raise ValueError(
                f"invalid HE preset parameters: unknown fields {sorted(extra)}, "
                f"missing fields {sorted(missing)}"
            )
        kwargs = dict(params)
        kwargs["coeff_mod_bit_sizes"] = tuple(kwargs["coeff_mod_bit_sizes"])
        kwargs["eval_keys"] = tuple(kwargs.get("eval_keys", ()))
        kwargs["galois_steps"] = tuple(kwargs.get("galois_steps", ()))
        preset = cls(**kwargs)
        preset.validate()
        return preset

    # ------------------------------------------------------------------ validation
    def validate(self) -> HEPreset:
        """Refuse insecure or inconsistent parameters.

        Returns
        -------
        HEPreset
            ``self``, so ``PRESET = HEPreset(...).validate()`` reads naturally.

        Raises
        ------
        ValueError
            With a message naming the preset, the offending field and the allowed range.
        """
        fail = self._fail
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            fail("name must be lower-case [a-z0-9_-]")
        scheme = self.scheme  # raises for an unknown backend
        if not isinstance(self.wire_id, int) or not 1 <= self.wire_id <= 255:
            fail(f"wire_id must be an int in 1..255, got {self.wire_id!r}")

        n = self.poly_modulus_degree
        if n not in MAX_COEFF_BITS_128:
            fail(
                f"poly_modulus_degree must be a power of two in 1024..32768, got {n!r} "
                f"(allowed: {sorted(MAX_COEFF_BITS_128)})"
            )
        bits = self.coeff_mod_bit_sizes
        if not isinstance(bits, tuple) or not bits:
            fail("coeff_mod_bit_sizes must be a non-empty tuple of ints")
        if any(not isinstance(b, int) or not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS for b in bits):
            fail(f"every prime must be {MIN_PRIME_BITS}..{MAX_PRIME_BITS} bits, got {list(bits)}")
        limit = MAX_COEFF_BITS_128[n]
        if self.total_coeff_bits > limit:
            fail(
                f"total coefficient modulus is {self.total_coeff_bits} bits but N={n} allows at "
                f"most {limit} bits for 128-bit security (HomomorphicEncryption.org); use fewer "
                "or smaller primes, or a larger N"
            )

        for kind in self.eval_keys:
            if kind not in EVAL_KEY_KINDS:
                fail(f"eval_keys may only contain {sorted(EVAL_KEY_KINDS)}, got {kind!r}")
        if len(set(self.eval_keys)) != len(self.eval_keys):
            fail("eval_keys lists a key twice")
        if len(bits) == 1 and self.eval_keys:
            fail("evaluation keys need key switching, i.e. at least two primes (data + special)")
        if self.backend.startswith("tenseal-") and len(bits) < 2:
            fail("TenSEAL needs at least two primes (it refuses contexts without key switching)")
        steps = self.galois_steps
        if not isinstance(steps, tuple) or any(
            isinstance(k, bool) or not isinstance(k, int) or not 0 < abs(k) < n // 2 for k in steps
        ):
            fail(f"galois_steps must be a tuple of non-zero ints with |step| < N/2, got {steps!r}")
        if len(set(steps)) != len(steps):
            fail("galois_steps lists a step twice")
        if steps and ("galois" not in self.eval_keys or self.backend != "seal-ckks"):
            fail("galois_steps needs 'galois' in eval_keys and the 'seal-ckks' backend")
        if self.backend != "seal-ckks" and (self.complex_packing or self.seeded):
            fail("complex_packing and seeded are only implemented by the 'seal-ckks' backend")

        if scheme == "ckks":
            self._validate_ckks()
        else:
            self._validate_bfv()
        return self

    def _fail(self, msg: str) -> NoReturn:
        raise ValueError(f"HE preset {self.name!r}: {msg}")

    def _validate_ckks(self) -> None:
        fail = self._fail
        if self.plain_modulus_bits is not None or self.fixed_point_bits is not None:
            fail("plain_modulus_bits/fixed_point_bits are BFV-only; a CKKS preset sets scale_bits")
        s = self.scale_bits
        if not isinstance(s, int) or s < MIN_SCALE_BITS:
            fail(f"CKKS needs an int scale_bits >= {MIN_SCALE_BITS}, got {s!r}")
        q0 = self.coeff_mod_bit_sizes[0]
        if s >= q0:
            fail(f"scale 2^{s} must be below the first prime (2^{q0}): the value would wrap")
        if q0 - s < MIN_HEADROOM_BITS:
            fail(
                f"headroom q0 - scale = {q0 - s} bits is below {MIN_HEADROOM_BITS}; the summed "
                "values and noise would overflow the first prime"
            )
        middle = self.coeff_mod_bit_sizes[1 : self.data_primes]
        # TenSEAL resets the scale to 2**scale_bits after every rescale, so its primes must
        # match the scale; raw SEAL (seal-ckks) tracks exact scales and FOCAL sets them itself.
        if self.backend.startswith("tenseal-") and any(b != s for b in middle):
            fail(
                f"intermediate primes {list(middle)} must equal scale_bits={s}; otherwise every "
                "rescale adds a systematic relative error (TenSEAL resets the scale)"
            )

    def _validate_bfv(self) -> None:
        fail = self._fail
        if self.scale_bits is not None:
            fail("scale_bits is CKKS-only; a BFV preset sets plain_modulus_bits/fixed_point_bits")
        t, f = self.plain_modulus_bits, self.fixed_point_bits
        if not isinstance(t, int) or not isinstance(f, int):
            fail("BFV needs int plain_modulus_bits and fixed_point_bits")
        min_t = self.poly_modulus_degree.bit_length() + 2  # a batching prime is 1 mod 2N
        if not min_t <= t <= MAX_PRIME_BITS:
            fail(f"plain_modulus_bits must be {min_t}..{MAX_PRIME_BITS} for N, got {t}")
        q_bits = sum(self.coeff_mod_bit_sizes[: self.data_primes])
        if q_bits - t < MIN_BFV_NOISE_BITS:
            fail(
                f"data modulus ({q_bits} bits) leaves only {q_bits - t} bits over the plain "
                f"modulus; need >= {MIN_BFV_NOISE_BITS} for fresh noise plus additions"
            )
        if not 1 <= f <= t - 3:
            fail(f"fixed_point_bits must be 1..plain_modulus_bits-3 (= {t - 3}), got {f}")


def _registry(*presets: HEPreset) -> dict[str, HEPreset]:
    out: dict[str, HEPreset] = {}
    for p in presets:
        p.validate()
        if p.name in out or any(q.wire_id == p.wire_id for q in out.values()):
            raise ValueError(f"duplicate preset name or wire_id: {p.name!r}")
        out[p.name] = p
    return out


DEFAULT_PRESET = "compact"

#: The closed set of presets; ``keygen(..., preset=name)`` looks names up here.
PRESETS: dict[str, HEPreset] = _registry(
    HEPreset(
        name="compact",
        backend="seal-ckks",
        wire_id=1,
        poly_modulus_degree=4096,
        # q0 = 52 bits: 2**(52-36-3) = 8192 of range for the *unweighted* model (the aggregate
        # can be as large as any one institution's value). 46 bits held 128, less than the
        # BatchNorm running variances of ImageNet-pretrained EfficientNet-Lite0 (up to 566);
        # the price is ~0.65 B/param up, the precision (scale 2^36) is unchanged.
        coeff_mod_bit_sizes=(52,),
        scale_bits=36,
        complex_packing=True,
        seeded=True,
        description=(
            "Default. Raw SEAL CKKS, one 52-bit prime, scale 2^36, seeded symmetric encryption, "
            "two reals per complex slot: ~7.5 B/param up, ~14.9 B/param down, |values| <= 8192; "
            "additions only."
        ),
    ),
    HEPreset(
        name="ckks",
        backend="tenseal-ckks",
        wire_id=2,
        poly_modulus_degree=4096,
        # Data prime 50 bits: 2**(50-34-3) = 8192 of range, as compact; [44,60] held 128, which
        # ResNet-18's first-round local models exceed (BatchNorm variances up to 982 measured in
        # bench_he_fedavg.py's setting); +2.2 B/param.
        coeff_mod_bit_sizes=(50, 59),
        scale_bits=34,
        description="TenSEAL CKKS [50,59], scale 2^34, symmetric: ~28.9 B/param, |values| <= 8192.",
    ),
    HEPreset(
        name="bfv",
        backend="tenseal-bfv",
        wire_id=3,
        poly_modulus_degree=4096,
        coeff_mod_bit_sizes=(50, 59),
        # Data prime 50 bits, t = 38 bits: 50 - 38 = 12 bits (MIN_BFV_NOISE_BITS) over the plain
        # modulus, so sums of 1000 uploads decrypt exactly (9 bits already fail there), and the
        # range is 2**(38-2-24) - 1 = 4095. The former [45,60] with t = 30 held only 15, less
        # than ResNet-18's BatchNorm running variances (global model ~25, first-round local
        # models up to 982); ~0.9 B/param more.
        plain_modulus_bits=38,
        fixed_point_bits=24,
        description=(
            "TenSEAL BFV [50,59], 38-bit batching prime, 24-bit fixed point: exact additions "
            "of up to 1000 uploads, ~14.4 B/param, |values| <= 4095."
        ),
    ),
    HEPreset(
        name="nvflare",
        backend="tenseal-ckks",
        wire_id=4,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(60, 40, 40),
        scale_bits=40,
        description="NVFlare HEBuilder defaults (benchmark reference): ~57.6 B/param.",
    ),
)


#: Presets for FOCAL split training (server-side multiply/rotate; see flower_focal.crypto.ckks).
#: Kept out of :data:`PRESETS`, the aggregation presets HE-FedAvg offers, because they carry
#: evaluation keys and a modulus chain HE-FedAvg does not need; :func:`get_preset` finds both.
FOCAL_PRESETS: dict[str, HEPreset] = _registry(
    HEPreset(
        name="focal",
        backend="seal-ckks",
        wire_id=5,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(60, 40, 60),
        scale_bits=29,
        seeded=True,
        eval_keys=("galois", "relin"),
        galois_steps=(16, 32, 64, 128, 256, 512, 1024, 2048),
        description=(
            "FOCAL split training (flower_focal.focal). Raw SEAL CKKS, N=8192 (4096 slots), data "
            "primes q0=60 (the level the head W lives at) and q1=40 (dropped by the one rescale "
            "of the backward pass), 60-bit special prime: 160 of 218 bits allowed at 128-bit "
            "security. Head scale 2^29 (embeddings 2^23, see crypto.ckks.LevelPlan). Seeded "
            "symmetric uploads. Galois keys only for the left rotations by 16..2048, i.e. the "
            "lane sums of FOCAL layouts with sample blocks of 2..256."
        ),
    ),
)

ALL_PRESETS: dict[str, HEPreset] = _registry(*PRESETS.values(), *FOCAL_PRESETS.values())


def get_preset(preset: str | HEPreset) -> HEPreset:
    """Resolve a preset name (or pass a preset through, validated).

    Raises
    ------
    ValueError
        For an unknown name (the message lists the registered ones), an invalid preset, or a
        custom preset that reuses a registered name with other parameters.
    """
    if isinstance(preset, HEPreset):
        registered = ALL_PRESETS.get(preset.name)
        if registered is not None and registered != preset:
            raise ValueError(
                f"preset name {preset.name!r} is registered with different parameters; give a "
                "custom preset its own name"
            )
        return preset.validate()
    try:
        return ALL_PRESETS[preset]
    except KeyError:
        raise ValueError(
            f"unknown HE preset {preset!r}; choose one of: {', '.join(sorted(ALL_PRESETS))}"
        ) from None
