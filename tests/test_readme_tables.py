"""The README's measured tables are rendered, not pasted (``benchmarks/readme_tables.py``).

Every marked table must equal its rendering from ``benchmarks/results/`` or from the code, so
a figure edited by hand, a results file changed without ``--write``, or a run-config default
changed in ``flower_focal/config.py`` without the README fails here. The ``run`` tables that
need ``../shared/data`` are skipped without it (the rest still run).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import subprocess
import sys

import pytest

from flower_focal.simulation import repo_root

ROOT = repo_root()
spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
readme_tables = importlib.util.module_from_spec(spec)
sys.modules["readme_tables"] = readme_tables  # its dataclass looks itself up there
spec.loader.exec_module(readme_tables)


def test_every_marked_table_equals_its_rendering():
    text = (ROOT / "README.md").read_text()
    new, status = readme_tables.regenerate(text, sorted(readme_tables.TABLES))
    assert "missing from the README" not in status.values(), status  # every renderer has its section
    rendered = [name for name, what in status.items() if what == "rendered"]
    assert {n for n, t in readme_tables.TABLES.items() if t.kind in ("results", "code")} <= set(rendered), status
    if new != text:
        diff = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), "README.md", "rendered"))
        raise AssertionError("README tables differ from their renderings; run "
                             "`python benchmarks/readme_tables.py --write`:\n" + diff)


def test_a_hand_edited_figure_is_put_back():
    text = (ROOT / "README.md").read_text()
    row = "| pathmnist, IID | fedavg | 0.963 ± 0.006 |"
    assert row in text  # the quality table's fedavg row, as bench_quality measured it
    edited = text.replace(row, "| pathmnist, IID | fedavg | 0.971 ± 0.006 |")
    new, _ = readme_tables.regenerate(edited, ["quality"])
    assert new == text


def test_a_stale_default_in_a_settings_table_is_put_back():
    text = (ROOT / "README.md").read_text()
    row = "| `local-epochs` | 3 |"
    assert row in text
    new, _ = readme_tables.regenerate(text.replace(row, "| `local-epochs` | 2 |"), ["settings-training"])
    assert new == text


def test_check_exits_nonzero_with_a_diff(tmp_path):
    text = (ROOT / "README.md").read_text()
    real = re.search(r"^\| `compact` \| (\d+\.\d\d) s \|", text, re.MULTILINE).group(1)  # the micro table's
    fake = "9.99" if real != "9.99" else "8.88"
    readme = tmp_path / "README.md"
    readme.write_text(text.replace(f"| `compact` | {real} s |", f"| `compact` | {fake} s |", 1))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "--check",
                           "--readme", str(readme), "--tables", "he-fedavg-micro"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"-| `compact` | {fake} s |" in proc.stdout and f"+| `compact` | {real} s |" in proc.stdout


def test_unknown_and_unclosed_markers_are_refused():
    with pytest.raises(ValueError, match="without a renderer"):
        readme_tables.regenerate("<!-- table:nonesuch -->\nx\n<!-- /table:nonesuch -->\n", [])
    with pytest.raises(ValueError, match="closing marker"):
        readme_tables.regenerate("<!-- table:quality -->\n| x |\n", [])


def test_every_results_file_says_where_it_came_from():
    results = ROOT / "benchmarks" / "results"
    index = (results / "README.md").read_text()
    used = {src for t in readme_tables.TABLES.values() for src in t.sources if src.endswith(".json")}
    files = {p.name for p in results.glob("*.json")}
    assert files == used  # no orphan results, no table reading a missing file
    for name in sorted(files):
        doc = json.loads((results / name).read_text())
        assert f"`{name}`" in index, f"{name} is not listed in benchmarks/results/README.md"
        assert "benchmark" in doc
        if "source" in doc:  # a transcription or a partial record: it names how it was measured
            assert "command" in doc or "commands" in doc or all("command" in r for r in doc["rows"]), name
        else:  # a benchmark's own output: its settings are the command line's (or every case's own)
            assert ("settings" in doc or "command" in doc.get("provenance", {})) and "machine" in doc, name


def test_the_comparison_example_is_the_reports_own_summary_table():
    # The example is rendered from the report.json its command wrote; the summary table that
    # run's report.md held is stored next to it, so the renderer must reproduce it cell for cell
    # (and the columns are the ones `flower-focal report` writes today).
    from flower_focal.compare import SUMMARY_HEADER

    doc = json.loads((ROOT / "benchmarks" / "results" / "comparison-example.json").read_text())
    rendered = readme_tables.render_comparison_example().splitlines()
    assert rendered[0] == "| " + " | ".join(SUMMARY_HEADER) + " |"
    assert rendered == doc["report_md_summary"]
    assert len(rendered) == 2 + len(doc["report"]["runs"]) >= 5


def test_focal_scale_before_evaluation_bytes_are_consistent():
    # The tree before evaluation by logits did not record evaluation's bytes; the renderer takes
    # them as the before round's bytes down less the after round's training share. Evaluation
    # sent the same (the head and feature moments, ~8.0 MiB per institution) in every round, so
    # the derivation must give the same figure for both rounds.
    results = ROOT / "benchmarks" / "results"
    before = json.loads((results / "focal_scale-before.json").read_text())["results"]
    after = json.loads((results / "focal_scale.json").read_text())["results"]
    for b, a in zip(before, after, strict=True):
        derived = [readme_tables._focal_scale_eval_mib(rb, ra) for rb, ra in zip(b["rounds"], a["rounds"], strict=True)]
        assert max(derived) - min(derived) <= 0.2, derived
        assert abs(derived[0] / a["institutions"] - 8.0) < 0.1, derived
