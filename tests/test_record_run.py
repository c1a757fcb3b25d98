"""scripts/record_run.py, which times the commands the README quotes: a first run split into its phases from the
run's own timed lines, and a fresh clone that runs outside this checkout with empty caches."""

import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
R = runpy.run_path(str(ROOT / "scripts" / "record_run.py"), run_name="record_run")


def test_phases_come_from_the_runs_timed_lines():
    lines = [(0.5, "Collecting torch"), (61.0, "[a2ats] loading SmolLM2"), (70.0, "calibration, forward 0/81920"),
             (400.0, "[a2ats] saved codebooks to /c.safetensors (forward 254.2 s, k-means 150.9 s)"), (490.0, "A: 42")]
    assert R["phases"](lines, 500.0) == {"setup_s": 61.0, "calibration_forward_s": 254.2,
                                         "calibration_kmeans_s": 150.9, "rest_s": round(500.0 - 61.0 - 254.2 - 150.9, 1)}
    assert R["phases"]([(1.0, "no library line")], 2.0) == {}


def test_a_fresh_clone_runs_outside_this_checkout_with_empty_caches(tmp_path):
    out = tmp_path / "run.json"
    probe = ("import os; assert not os.environ.get('PYTHONPATH'); print('[a2ats] in', os.getcwd()); "
             "print('[a2ats] cache', os.environ['A2ATS_CACHE']); print('[a2ats] kernels', os.environ['A2ATS_KERNEL_DIR']); "
             "print(os.path.exists('scripts/record_run.py'))")
    assert R["main"](["--out", str(out), "--fresh-clone", "--", sys.executable, "-c", probe]) == 0
    rec = json.loads(out.read_text())
    assert rec["fresh_clone"] and rec["fresh_cache"] and rec["returncode"] == 0
    cwd = rec["output_tail"][0].split(" in ", 1)[1]
    assert Path(cwd).name == "a2ats" and Path(cwd) != ROOT and rec["output_tail"][-1] == "True"
    assert all(str(ROOT) not in line for line in rec["output_tail"][1:3])
    assert set(rec["phases"]) == {"setup_s", "rest_s"}
