"""An eval run records its provenance beside its results, one record per part of a run done in parts."""

import json

from a2ats.eval import harness, report
from conftest import tiny_model


def test_each_run_appends_its_provenance_with_its_first_row(tmp_path, monkeypatch):
    written = []

    def sweep(model, tokenizer, cfg, out_dir, rows, done, progress, log, only=None):  # two rows a part
        with open(out_dir / "results.jsonl", "a") as f:
            for m in ("full", "streaming"):
                row = {"task": "niah_single_number_essay", "length": 200, "seed": len(written), "method": m,
                       "budget": 1.0, "score": 1.0, "attended_per_kv_head": 1.0}
                f.write(json.dumps(row) + "\n")
                rows.append(row)
        written.append(1)

    monkeypatch.setattr(harness, "_sweep", sweep)
    cfg = harness.EvalConfig(tasks=("niah_single_number_essay",), lengths=(200,), methods=("full", "streaming"),
                             budgets=(1.0,), model="tiny")
    out = tmp_path / "run"
    model = tiny_model("llama")
    harness.run(model, None, cfg, out, progress=False, log=lambda *_: None)
    harness.run(model, None, cfg, out, progress=False, log=lambda *_: None, only="tasks")

    runs = json.loads((out / "provenance.json").read_text())["runs"]
    assert [r["first_row"] for r in runs] == [0, 2]
    assert all({"commit", "dirty", "cpu", "torch", "transformers", "date", "command", "defaults"} <= set(r)
               for r in runs)
    assert runs[0]["settings"]["model"] == "tiny" and runs[1]["settings"]["only"] == "tasks"
    # the report reads results.jsonl as before: the provenance file beside it changes nothing
    assert len(report.load_rows(out / "results.jsonl")) == 4
