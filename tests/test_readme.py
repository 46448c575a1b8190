"""The README's two commands, verbatim, on a fresh clone (the first with the embedded database)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    commands = readme_commands()
    assert len(commands) == 2
    assert "tally demo" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TALLY_README_NESTED") == "1", reason="already inside a fresh clone")
def test_readme_commands_work_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TALLY_", "VIRTUAL_ENV", "PYTEST"))}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)
    demo, tests = readme_commands()
    try:
        proc = subprocess.run(demo, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "embedded PostgreSQL" in proc.stderr
        assert "0 failed steps" in proc.stdout and "demo finished" in proc.stdout
        # the test command, restricted to a quick subset so the suite does not run itself
        nested = dict(env, TALLY_README_NESTED="1", PYTEST_ADDOPTS="-q -p no:cacheprovider tests/test_smoke.py")
        proc = subprocess.run(tests, shell=True, cwd=clone, env=nested, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert re.search(r"\b1 passed\b", proc.stdout)
    finally:
        subprocess.run([str(clone / ".venv" / "bin" / "tally"), "db", "stop"], cwd=clone, env=env,
                       capture_output=True, timeout=120)
