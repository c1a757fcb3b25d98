"""The provenance record every result file carries: its keys, dirty-tree detection, the command."""

import json
import subprocess
import sys

import pytest

from a2ats import provenance as P

KEYS = {"commit", "dirty", "dirty_paths", "cpu", "cpu_flags", "cores", "usable_cores", "gpu", "torch_threads",
        "python", "torch", "transformers", "a2ats", "date", "command", "defaults", "settings"}


def test_record_has_every_key_and_is_json():
    rec = P.provenance({"lengths": (2048, 4096), "model": "m"})
    assert KEYS <= set(rec)
    assert json.loads(json.dumps(rec)) == rec  # JSON-ready as is
    assert rec["settings"] == {"lengths": [2048, 4096], "model": "m"}
    assert rec["cores"] >= 1 and rec["torch_threads"] >= 1 and rec["cpu"]
    assert set(rec["cpu_flags"]) <= set(P.CPU_FLAGS) | {f for f in rec["cpu_flags"] if f.startswith("amx_")}
    assert rec["date"].endswith("+00:00")  # UTC
    # the defaults in force, both halves
    assert rec["defaults"]["A2ATSConfig"]["reduction"] == "max"
    assert rec["defaults"]["CodebookSettings"]["n_centroids"] == 4096


def test_commit_of_this_checkout_or_installed_version():
    rec = P.provenance()
    commit = rec["commit"]
    assert commit is not None
    if commit.startswith("a2ats=="):  # not a git checkout
        assert rec["dirty"] is None
    else:
        assert len(commit) == 40 and isinstance(rec["dirty"], bool)


def test_command_is_the_full_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/x/bin/a2ats", "bench", "decode", "--variants", "a b", "--steps", "8"])
    assert P.provenance()["command"] == "/x/bin/a2ats bench decode --variants 'a b' --steps 8"


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_dirty_detection_on_a_temp_repo(tmp_path):
    try:
        _git(tmp_path, "init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git not available")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()

    assert P.git_state(tmp_path) == (head, False, [])
    (tmp_path / "result.json").write_text("{}")  # an untracked result file: still clean
    assert P.git_state(tmp_path) == (head, False, [])
    (tmp_path / "a.py").write_text("x = 2\n")  # a tracked change: dirty, and which path
    assert P.git_state(tmp_path) == (head, True, ["a.py"])


def test_not_a_checkout(tmp_path):
    commit, dirty, paths = P.git_state(tmp_path)
    assert commit is None and dirty is None and paths == []
