"""The README's set-up commands are the ones CI actually runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"^TEST_COMMAND='(.+)'$", ci, re.MULTILINE)
    assert match, ".ci/run must define TEST_COMMAND='...'"
    readme = (ROOT / "README.md").read_text()
    assert f"\n{match.group(1)}\n" in readme, "README.md must show the exact test command that .ci/run runs"
    assert 'bash -c "$TEST_COMMAND"' in ci
    assert "DKMEANS_DATA_DIR" in ci and "../shared/data/mnist" in ci


def test_readme_main_job_runs_dkmeans_fit_first():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.+?)\n```", readme, re.DOTALL)
    assert len(blocks) >= 2
    assert "pip install" in blocks[0] and "dkmeans fit" in blocks[0]
    assert "pip install" in blocks[1] and "pytest" in blocks[1]
