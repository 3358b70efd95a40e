"""Homomorphic encryption for HE-FedAvg: the only package in flower-focal that imports TenSEAL.

Threat model: an honest-but-curious server. Institutions share one secret key made by
:func:`keygen`; the server loads only the public context (parameters, plus evaluation keys a
preset explicitly lists) and only *adds* ciphertexts. Clients weight their update before
encrypting, so no multiply/rescale happens on the server.

Typical use::

    keygen(Path("keys"), "compact")                     # once, by the key holder
    he_secret = SecretContext.load("keys")              # every institution
    blob = he_secret.encrypt(w_i * flat_update).to_bytes()
    he_public = PublicContext.load("keys/public.ctx")   # the server
    acc = Accumulator(he_public)
    for b in blobs: acc.add(b)                          # CiphertextError -> drop that upload
    mean = he_secret.decrypt(acc.to_bytes())            # institutions

What callers must know (limits of this threat model):

* One shared secret key: the server colluding with any single institution can decrypt every
  individual upload. Threshold/multi-key HE is out of scope (needs OpenFHE or Lattigo).
* CKKS decryptions leak (Li-Micciancio, EUROCRYPT 2021): a party holding both the ciphertexts
  and a decrypted CKKS result can recover the secret key. Never give the server a decrypted
  CKKS aggregate (e.g. a published global model); use the exact ``bfv`` preset if it must
  see one, or rotate keys.
* Ciphertexts are checksummed, not authenticated: they catch corruption and foreign keys, not
  a malicious institution that encrypts garbage under the shared key.
* Keep ``|sum| <= preset.max_abs_value`` (see :mod:`.params`); overflow decrypts to garbage.

Modules: :mod:`.params` (presets, security rules), :mod:`.keys` (key files, contexts),
:mod:`.envelope` (wire format), :mod:`.aggregate` (server sum), :mod:`.backends` (SEAL /
TenSEAL calls), :mod:`.ckks` (FOCAL's server evaluator / institution key holder and the level
plan of preset ``focal``, see :data:`FOCAL_PRESETS`).
"""

from __future__ import annotations

from flower_focal.crypto.aggregate import Accumulator
from flower_focal.crypto.ckks import CkksEvaluator, CkksKeyHolder, LevelPlan
from flower_focal.crypto.envelope import EncryptedVector
from flower_focal.crypto.errors import CiphertextError
from flower_focal.crypto.keys import (
    MANIFEST_FILE,
    PUBLIC_FILE,
    SECRET_FILE,
    PublicContext,
    SecretContext,
    fingerprint,
    keygen,
    read_manifest,
    server_share,
)
from flower_focal.crypto.params import (
    ALL_PRESETS,
    DEFAULT_PRESET,
    FOCAL_PRESETS,
    MAX_COEFF_BITS_128,
    PRESETS,
    HEPreset,
    get_preset,
)

__all__ = [
    "ALL_PRESETS",
    "DEFAULT_PRESET",
    "FOCAL_PRESETS",
    "MANIFEST_FILE",
    "MAX_COEFF_BITS_128",
    "PRESETS",
    "PUBLIC_FILE",
    "SECRET_FILE",
    "Accumulator",
    "CiphertextError",
    "CkksEvaluator",
    "CkksKeyHolder",
    "EncryptedVector",
    "HEPreset",
    "LevelPlan",
    "PublicContext",
    "SecretContext",
    "fingerprint",
    "get_preset",
    "keygen",
    "read_manifest",
    "server_share",
]
