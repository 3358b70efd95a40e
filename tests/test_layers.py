"""Layering: the apps never load the test harness; the harness's old import paths still resolve."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_server_and_client_apps_do_not_import_the_testing_harness():
    code = ("import sys, strategies.server_app, clients.client_app; "
            "print(sorted(m for m in sys.modules if m.startswith('flower_focal.testing')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_moved_focal_names_resolve_with_a_deprecation_warning():
    import flower_focal.focal as focal
    import flower_focal.testing as testing

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert focal.train_plaintext is testing.train_plaintext
        assert focal.Institution is testing.InstitutionEmbeddings
    assert [w.category for w in caught] == [DeprecationWarning, DeprecationWarning]
    assert "train_plaintext" not in focal.__all__
