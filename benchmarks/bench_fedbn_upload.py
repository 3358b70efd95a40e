"""Upload size of he-fedavg with and without FedBN's normalisation layers in the encrypted vector.

    python benchmarks/bench_fedbn_upload.py --models small-cnn resnet18 > benchmarks/results/fedbn_upload.json

Under ``fedbn=true`` he-fedavg leaves the normalisation layers (BatchNorm/GroupNorm/LayerNorm
weights, biases, running statistics, step counters: :func:`flower_focal.models.norm_keys`) out
of the encrypted vector (:attr:`flower_focal.flatten.ArrayLayout.local`). For each model the
JSON gives the vector length with every array and without the normalisation layers, and the
chunks and bytes of one real upload ciphertext of each (a fresh key of ``--preset``; random
values: the chunk count does not depend on them, the bytes by a few dozen per chunk, as the
serialised chunks are compressed). 3 input channels, 9 classes, 28 x 28 images (PathMNIST).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, loadavg, machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["small-cnn", "resnet18"])
    p.add_argument("--preset", default="compact")
    args = p.parse_args()

    import numpy as np
    from flwr.app import ArrayRecord

    from flower_focal.crypto import SecretContext, keygen
    from flower_focal.flatten import ArrayLayout
    from flower_focal.models import build_model, norm_keys

    t0 = time.time()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        secret = SecretContext.load(keygen(Path(tmp) / "keys", args.preset))
        rng = np.random.default_rng(0)
        for name in args.models:
            model = build_model(name, 3, 9, 28)
            record = ArrayRecord(model.state_dict())
            full, fedbn = ArrayLayout.of(record), ArrayLayout.of(record, local=norm_keys(model))
            sizes = {}
            for label, layout in (("all_arrays", full), ("fedbn", fedbn)):
                vector = secret.encrypt(rng.uniform(-1, 1, layout.size))
                sizes[label] = {"values": layout.size, "chunks": len(vector.chunks),
                                "ciphertext_bytes": len(vector.to_bytes())}
            rows[name] = {**sizes, "local_arrays": len(fedbn.local),
                          "values_saved": full.size - fedbn.size,
                          "bytes_saved": sizes["all_arrays"]["ciphertext_bytes"] - sizes["fedbn"]["ciphertext_bytes"]}
    emit({"benchmark": "fedbn_upload", "settings": vars(args), "models": rows,
          "wall_s": round(time.time() - t0, 1), "machine": machine(), "load": loadavg()})


if __name__ == "__main__":
    main()
