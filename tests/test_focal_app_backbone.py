"""FOCAL with an app's own, randomly initialised network as the frozen backbone (fast tier).

The slow twin of these tests is ``test_foreign_app.py``'s FOCAL run through ``flwr run``: there,
an import-time ``torch.manual_seed(0); Net()`` raced with the ServerApp thread's draws from
torch's global RNG and institutions embedded with different networks (CI saw the head 0.92
away from its plaintext twin). Here: :class:`FrozenBackbone` builds the network from its seed
where it embeds, institutions send a backbone fingerprint, and the server refuses a run whose
institutions differ. Driven by the loopback grid (real ClientApp, real CKKS, no Ray).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flower_focal.cache import CACHE
from flower_focal.client.focal import (
    FrozenBackbone,
    LoaderSource,
    backbone_fingerprint,
    register_focal,
)
from flower_focal.crypto import keygen
from flower_focal.encrypted_model import decrypt_file
from flower_focal.testing import InstitutionEmbeddings, train_plaintext
from flower_focal.strategy.focal import Focal, MixedBackbones
from flower_focal.testing import LoopbackGrid

NODES, CLASSES, ROUNDS, LR = 3, 3, 2, 2.0


class Net(nn.Module):
    """A quickstart-style network for 1-channel 12x12 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 5 * 5, 8)
        self.out = nn.Linear(8, CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(torch.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def load_data(pid: int) -> tuple[DataLoader, DataLoader]:
    rng = np.random.default_rng(pid)
    n = 12 + 4 * pid
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(0, 0.5, (n, 1, 12, 12)).astype(np.float32)
    x[np.arange(n), 0, 3 * y + 1, 3 * y + 1] += 3.0  # a class-dependent bright pixel
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())
    return DataLoader(data, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(pid)), \
        DataLoader(data, batch_size=5)


def focal_app(seed: int) -> ClientApp:
    app = ClientApp()
    register_focal(app, backbone=FrozenBackbone(lambda: Net().features, seed=seed),
                   data=lambda ctx: load_data(int(ctx.node_config["partition-id"])))
    return app


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("keys"), "focal")


def run_focal(key_dir, app, grid=None) -> tuple[Focal, object]:
    grid = grid or LoopbackGrid(app, NODES, {"he-key-dir": str(key_dir)})
    strategy = Focal.from_key_dir(key_dir, num_classes=CLASSES, lr=LR)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=ROUNDS)
    return strategy, result


def test_frozen_backbone_is_the_seeded_network_built_lazily_without_touching_the_global_rng():
    lazy = FrozenBackbone(lambda: Net().features, seed=3)
    assert lazy._net is None  # nothing is built at registration (import) time
    torch.manual_seed(123)
    before = torch.get_rng_state()
    images = torch.randn(2, 1, 12, 12)
    state = torch.get_rng_state()
    got = lazy(images)
    assert torch.equal(torch.get_rng_state(), state)  # the app's own RNG stream is untouched
    torch.manual_seed(3)
    reference = Net()
    assert torch.allclose(got, reference.features(images))
    assert backbone_fingerprint(lazy) == backbone_fingerprint(reference.features)
    shipped = pickle.loads(pickle.dumps(FrozenBackbone(Net, seed=3)))  # how Ray ships the app
    assert shipped._net is None and shipped.seed == 3
    assert not torch.equal(before, state)


def test_backbone_fingerprint_tells_networks_and_methods_apart():
    torch.manual_seed(0)
    a = Net()
    torch.manual_seed(0)
    b = Net()
    torch.manual_seed(1)
    c = Net()
    assert backbone_fingerprint(a.features) == backbone_fingerprint(b.features)
    assert backbone_fingerprint(a.features) != backbone_fingerprint(c.features)  # other weights
    assert backbone_fingerprint(a.features) != backbone_fingerprint(a)  # features vs forward
    with torch.no_grad():
        b.fc.bias[0] += 1e-6
    assert backbone_fingerprint(a.features) != backbone_fingerprint(b.features)  # one weight moved
    assert backbone_fingerprint(lambda x: x) is None  # an opaque callable cannot be checked


def test_focal_on_the_apps_network_equals_its_plaintext_twin(key_dir, tmp_path):
    strategy, result = run_focal(key_dir, focal_app(seed=0))
    weights = decrypt_file(strategy.save_final_model(result, tmp_path / "head.he"), key_dir)
    torch.manual_seed(0)
    backbone = Net().features
    institutions = []
    for pid in range(NODES):
        train, _ = load_data(pid)
        with torch.no_grad():
            x = torch.cat([backbone(images) for images, _ in DataLoader(train.dataset, batch_size=5)])
        institutions.append(InstitutionEmbeddings(str(pid), x.double().numpy(), train.dataset.tensors[1].numpy()))
    twin = train_plaintext(institutions, CLASSES, epochs=ROUNDS, lr=LR, init_seed=0)
    encrypted = np.vstack([weights["weight"].numpy().T, weights["bias"].numpy()[None, :]])
    assert float(np.abs(encrypted - twin.head).max()) <= 1e-4 * max(1.0, float(np.abs(twin.head).max()))


def test_institutions_with_different_backbones_stop_the_run_naming_them(key_dir):
    same, other = focal_app(seed=0), focal_app(seed=1)

    def app(message, context):  # institution 2 built its network from another seed
        return (other if int(context.node_config["partition-id"]) == 2 else same)(message, context)

    grid = LoopbackGrid(app, NODES, {"he-key-dir": str(key_dir)})
    odd = grid.node_ids[2]  # undescribed institutions are named by node id
    with pytest.raises(MixedBackbones, match="different frozen backbones") as info:
        run_focal(key_dir, app, grid)
    assert f"institutions [{odd}]" in str(info.value)
    assert "FrozenBackbone(lambda: Net().features, seed=0)" in str(info.value)  # says what to do


def test_loader_source_embeddings_live_in_the_process_cache_one_entry_set_per_source():
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    a = LoaderSource(FrozenBackbone(lambda: Net().features, seed=0), lambda c: load_data(1))
    b = LoaderSource(FrozenBackbone(lambda: Net().features, seed=1), lambda c: load_data(1))
    CACHE.clear("embeddings")
    xa = a(ctx, "train")
    assert a(ctx, "train") is xa and CACHE.stats("embeddings")["hits"] == 1
    xb = b(ctx, "train")  # same run, node and split, another source: its own entry
    assert xb is not xa and not np.allclose(xa[0], xb[0])
    assert CACHE.stats("embeddings")["bytes"] == sum(x.nbytes + y.nbytes for x, y in (xa, xb))
    CACHE.clear("embeddings")  # dropped (budget, or a reset): computed again, identically
    again = a(ctx, "train")
    assert again is not xa
    np.testing.assert_array_equal(again[0], xa[0])
    np.testing.assert_array_equal(again[1], xa[1])
