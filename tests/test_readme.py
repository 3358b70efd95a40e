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
