"""The README's quick start is what CI runs."""
import re

import yaml
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_commands():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = _bash_blocks(quick)
    assert len(blocks) == 2, "the quick start has two shell blocks: run the main job, run the tests"
    default = yaml.safe_load((REPO / "workflow" / "config" / "config.yaml").read_text())["experiments"][0]
    assert f"results/{default}/report.md" in blocks[0], "block 1 runs the default experiment's report"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for line in blocks[1].strip().splitlines():
        assert line in ci, f"README test command not in .ci/run: {line}"


def test_readme_names_every_experiment():
    readme = (REPO / "README.md").read_text()
    for p in sorted((REPO / "config" / "experiment").glob("*.yaml")):
        assert f"`{p.stem}`" in readme, f"experiment {p.stem} is not documented in the README"
