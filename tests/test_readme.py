"""The README contract: two set-up-and-run commands, the second being what .ci/run runs."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(__file__))


def readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [b.strip() for b in blocks if b.strip().startswith("python3 -m venv")]


def test_readme_gives_a_run_and_a_test_command():
    run, test = readme_commands()
    for cmd in (run, test):
        assert "pip install torch==2.13.0 && pip install -e" in cmd  # pinned CPU torch first
    assert test.endswith("python -m pytest tests")


def test_ci_runs_the_readme_test_command():
    _, test = readme_commands()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert test in ci
