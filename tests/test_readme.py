"""The README's quick-start lines are the ones that run: CI calls the test line verbatim."""

from __future__ import annotations

import re

from flower_focal.simulation import repo_root


def quick_start_lines() -> list[str]:
    text = (repo_root() / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_is_two_lines_and_ci_runs_the_test_line():
    run_line, test_line = quick_start_lines()
    assert "\n" not in run_line and "\n" not in test_line
    assert run_line.endswith("&& python -m simulations.run")
    assert test_line.endswith("&& python -m pytest -q -ra") and '".[test]"' in test_line
    ci = (repo_root() / ".ci" / "run").read_text()
    assert test_line in ci.splitlines()  # the exact line, not a variant of it


def test_layout_names_only_modules_that_exist_and_the_fab_rule_pyproject_has():
    text = (repo_root() / "README.md").read_text()
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in layout.splitlines() if line.startswith("| `flower_focal/` |"))
    named = re.findall(r"`([\w/]+(?:\.py|/))`", row.split("|")[2])
    assert "wire.py" in named and "testing/" in named
    package = repo_root() / "flower_focal"
    for name in named:  # top level, or inside the package the row is describing (strategy/specs.py)
        assert (package / name).exists() or any(package.glob(f"*/{name}")), f"README layout names {name}"
    pyproject = (repo_root() / "pyproject.toml").read_text()
    rules = re.findall(r"`(fab-\w+)` in `pyproject.toml`", text)
    assert rules
    for rule in rules:
        assert re.search(rf"^{rule} = ", pyproject, re.M), f"README cites {rule}, pyproject.toml has none"
