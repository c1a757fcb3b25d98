"""The figures in README.md and docs/ are generated from committed result files (scripts/figures/): none is
stale, a changed number in a result file is caught, and no measured figure stands outside a generated block."""

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "scripts" / "figures"
# what `python scripts/figures` runs, without running main: its __main__.py, with the folder on sys.path while it
# imports its modules (the block generators register themselves); F holds the names it imported (process,
# measured_figures, ...)
F = SimpleNamespace(**runpy.run_path(str(FIGURES), run_name="figures"))

SPEED = "docs/bench/speed"


def test_no_generated_block_is_stale():
    problems = F.process(ROOT)
    assert not problems, "run `make figures` (or fix the source):\n" + "\n".join(problems)


def test_no_measured_figure_outside_a_generated_block():
    found = F.measured_figures(ROOT)
    assert not found, ("a measured figure belongs in a generated block (scripts/figures/), or, if it is a "
                       "constant, on the ALLOWED list with its reason:\n" + "\n".join(found))


@pytest.fixture
def speed_root(tmp_path):
    """A copy of the speed report and the result files its blocks read (the first run's: the recorded demo)."""
    for rel in [f"{SPEED}/README.md", *(p.relative_to(ROOT).as_posix() for p in (ROOT / SPEED).rglob("*.json")),
                "docs/bench/commands/demo.json", "docs/bench/commands/calibrate-qwen.json"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=1))


def test_the_copy_is_up_to_date(speed_root):
    assert F.process(speed_root) == []


def test_a_changed_number_is_reported_as_its_stale_block(speed_root):
    def bump(d):
        next(r for r in d["rows"] if r["format"] == "int8")["perplexity"] += 0.5

    _edit(speed_root / f"{SPEED}/qwen/weights.json", bump)
    problems = F.process(speed_root)
    assert problems == [f"{SPEED}/README.md: block speed-weights is stale (run `make figures`)"]
    # the command line says the same and exits 1; make figures then brings the block up to date
    cli = [sys.executable, str(FIGURES), "--root", str(speed_root)]
    out = subprocess.run([*cli, "--check"], capture_output=True, text=True)
    assert out.returncode == 1 and "block speed-weights is stale" in out.stderr
    assert subprocess.run(cli, capture_output=True, text=True).returncode == 0
    assert F.process(speed_root) == []
    assert "| 58.573 (+0.07%) |" in (speed_root / f"{SPEED}/README.md").read_text()


def test_a_file_that_does_not_say_what_the_block_claims_is_an_error(speed_root):
    _edit(speed_root / f"{SPEED}/qwen/decode.json", lambda d: d.update(budget="rho=0.03"))
    problems = F.process(speed_root)
    assert problems and all("speed-breakdown" in p for p in problems)
    assert "budget 'rho=0.03', not the default's" in problems[0]


def test_a_table_from_two_machines_is_refused(speed_root):
    _edit(speed_root / f"{SPEED}/qwen/weights.json", lambda d: d["provenance"].update(cpu="Other CPU"))
    assert any("speed-weights" in p and "different machines" in p for p in F.process(speed_root))


def test_a_result_file_without_provenance_is_refused(speed_root):
    _edit(speed_root / f"{SPEED}/smollm2/prefill.json", lambda d: d.pop("provenance"))
    assert any("speed-prefill" in p and "no provenance record" in p for p in F.process(speed_root))


def test_unknown_blocks_and_unbalanced_markers(tmp_path):
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text("<!-- figures:nope -->\nold\n<!-- /figures:nope -->\n\n<!-- figures:speed-weights -->\n")
    problems = F.process(tmp_path)
    assert any("unbalanced" in p and "speed-weights" in p for p in problems)
    assert any("no generator for block 'nope'" in p for p in problems)


def test_inline_blocks_render_one_line(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text("`make test` takes <!-- figures:make-test -->stale<!-- /figures:make-test --> here.\n")
    assert F.process(tmp_path) == ["README.md: block make-test is stale (run `make figures`)"]
    F.process(tmp_path, write=True)
    assert doc.read_text() == ("`make test` takes <!-- figures:make-test -->(not yet measured)"
                               "<!-- /figures:make-test --> here.\n")


def test_the_lint_flags_measured_figures_only(tmp_path):
    doc = tmp_path / "docs" / "notes.md"
    doc.parent.mkdir()
    doc.write_text("\n".join([
        "It decodes at 51.9 ms per token, 3.68x dense, in ~2 min, at 12.8 tokens/s, reading 130 KiB.",
        "The default keeps 10% per KV head; the paper's ρ = 1.5%, 3%, 6% per query head; 95% intervals.",
        "```", "timed 5 min here, in a code fence", "```",
        "<!-- figures:x -->", "generated: 7.5 s", "<!-- /figures:x -->",
        "A 32K context, b = 2048, 4096 centroids, 8 sinks and 64 window tokens.",
    ]))
    (tmp_path / "docs" / "decode.json").write_text("{}")  # a tool's own table beside its data is a result file
    (tmp_path / "docs" / "decode.md").write_text("| 51.9 ms |")
    found = F.measured_figures(tmp_path)
    assert [f.split("  (")[0] for f in found] == [
        "docs/notes.md:1: 51.9 ms", "docs/notes.md:1: 3.68x", "docs/notes.md:1: ~2 min",
        "docs/notes.md:1: 12.8 tokens/s", "docs/notes.md:1: 130 KiB"]
