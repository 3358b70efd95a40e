"""he-fedavg clip-and-noise before encryption (distributed Gaussian noise)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from flower_focal import wire
from flower_focal.client.he_mod import decrypt_record, encrypt_record
from flower_focal.crypto import PublicContext, SecretContext, keygen
from flower_focal.flatten import ArrayLayout
from flower_focal.strategy.he_fedavg import HEFedAvg
from flower_focal.strategy.roster import Institution, InstitutionRoster

LAYOUT = ArrayLayout(names=("w",), shapes=((2000,),), dtypes=("float32",))


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("keys"), "compact")


def _noised(he_secret, local, ref):
    enc = encrypt_record(local, he_secret, LAYOUT, weight=1.0, reference=ref, clip_norm=1.0, noise_std=0.05)
    enc = ArrayRecord({**dict(enc.items()), wire.HE_WEIGHTS: Array(np.array([1.0, 1.0]))})
    return LAYOUT.flatten(decrypt_record(enc, he_secret, LAYOUT))


def test_noise_is_added_to_the_clipped_update_before_encryption_and_is_fresh_each_time(key_dir):
    he_secret = SecretContext.load(key_dir)
    ref = ArrayRecord({"w": Array(np.zeros(2000, np.float32))})
    local = ArrayRecord({"w": Array(np.full(2000, 1.0, np.float32))})
    out = _noised(he_secret, local, ref)
    clipped = np.full(2000, 1.0 / np.sqrt(2000))
    assert np.std(out - clipped) == pytest.approx(0.05, rel=0.1)
    # The same inputs (same run, institution and round) give independent noise: nothing public
    # regenerates it, so nobody can subtract it from the decrypted aggregate.
    again = _noised(he_secret, local, ref)
    corr = np.corrcoef(out - clipped, again - clipped)[0, 1]
    assert abs(corr) < 0.15 and np.std(again - out) == pytest.approx(0.05 * np.sqrt(2), rel=0.15)


def test_noise_needs_a_clip_norm(key_dir):
    with pytest.raises(ValueError, match="he-clip-norm"):
        HEFedAvg(he_public=PublicContext.load(key_dir), noise_multiplier=1.0)


class _Grid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)


def test_server_calibrates_the_noise_to_the_number_of_sampled_institutions(key_dir):
    roster = InstitutionRoster()
    for pid in range(4):
        roster.register(Institution(node_id=10 + pid, partition_id=pid, num_classes=2, in_channels=1, num_train=5))
    strategy = HEFedAvg(he_public=PublicContext.load(key_dir), clip_norm=2.0, noise_multiplier=1.5,
                        roster=roster, min_available_nodes=4)
    initial = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    strategy.bind_initial_model(initial)
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), _Grid([10, 11, 12, 13])))
    assert len(messages) == 4
    for m in messages:
        assert m.content["config"][wire.HE_NOISE_STD] == pytest.approx(1.5 * 2.0 / 2.0)
