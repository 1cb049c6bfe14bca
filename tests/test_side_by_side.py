"""benchmarks/side_by_side.py on a throwaway repository whose two commits' quality.py accept different run names."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_QUALITY = '''import json, sys
ACCEPTED = {accepted!r}
def _parse_run(run):
    if run not in ACCEPTED:
        raise SystemExit(f"--runs: {{run!r}}: unknown variant")
if __name__ == "__main__" and sys.argv[1] == "--worker":
    spec = json.loads(sys.argv[2])
    _parse_run(spec["run"])
    with open({log!r}, "a") as f:
        f.write(spec["run"] + "\\n")
    print(json.dumps({{"quant_seconds": 1.0, "peak_rss_mib": 10.0}}))
'''


@pytest.fixture
def repo(tmp_path):
    """A git repository with side_by_side.py and a stand-in quality.py: commit "base" accepts awq:w4g64, "head"
    also awq+new:w4g64. Returns (repository, the workers' log, the model folder)."""
    if shutil.which("git") is None:
        pytest.skip("git is needed")
    r, log, model = tmp_path / "repo", tmp_path / "workers.log", tmp_path / "model"
    (r / "benchmarks").mkdir(parents=True)
    model.mkdir()
    (model / "config.json").write_text("{}")
    shutil.copy(ROOT / "benchmarks" / "side_by_side.py", r / "benchmarks")
    (r / "benchmarks" / "example_data.py").write_text("def ensure_example(): pass\ndef example_model_dir(): pass\n")

    def git(*args):
        subprocess.run(["git", "-C", str(r), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    git("init", "-q")
    for tag, accepted in (("base", {"awq:w4g64"}), ("head", {"awq:w4g64", "awq+new:w4g64"})):
        (r / "benchmarks" / "quality.py").write_text(FAKE_QUALITY.format(accepted=accepted, log=str(log)))
        git("add", "-A")
        git("commit", "-qm", tag)
        git("tag", tag)
    return r, log, model


def side_by_side(repo, run):
    r, _, model = repo
    return subprocess.run([sys.executable, str(r / "benchmarks" / "side_by_side.py"), "--base", "base", "--head",
                           "head", "--run", run, "--pairs", "1", "--model", str(model)],
                          capture_output=True, text=True, timeout=120)


def test_a_run_name_one_code_lacks_stops_before_any_run(repo):
    proc = side_by_side(repo, "awq+new:w4g64")
    assert proc.returncode != 0
    assert "the base code" in proc.stderr and "does not take it" in proc.stderr and "unknown variant" in proc.stderr
    assert not repo[1].exists()  # no worker ran, not even the head's warm-up


def test_a_run_name_both_codes_take_runs_warm_up_and_pairs(repo):
    proc = side_by_side(repo, "awq:w4g64")
    assert proc.returncode == 0, proc.stderr
    assert repo[1].read_text().splitlines() == ["awq:w4g64"] * 4  # two warm-ups, one pair
    assert "head / base = 1.000x" in proc.stdout
