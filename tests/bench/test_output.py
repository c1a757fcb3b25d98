"""Every benchmark result file records its provenance (what produced it), in the file and in --json output."""

import json

from a2ats.bench.output import emit, with_provenance


def test_emit_writes_provenance(tmp_path, capsys):
    res = {"machine": "m", "model": "smollm2-135m", "dtype": "float32", "lengths": [2048], "rows": [{"ms": 1.0}]}
    emit(res, "| table |", "decode", str(tmp_path), None, False, lambda *_: None)
    written = json.loads((tmp_path / "decode.json").read_text())
    prov = written["provenance"]
    assert {"commit", "dirty", "cpu", "cpu_flags", "torch_threads", "torch", "transformers", "date", "command",
            "defaults"} <= set(prov)
    # the run's own settings: its scalar fields and lengths, not its rows
    assert prov["settings"] == {"machine": "m", "model": "smollm2-135m", "dtype": "float32", "lengths": [2048]}
    assert written["rows"] == res["rows"] and "provenance" not in res  # the caller's dict is left as it was
    assert (tmp_path / "decode.md").read_text() == "| table |"
    assert capsys.readouterr().out.strip() == "| table |"


def test_json_output_carries_provenance_too(capsys):
    emit({"rows": []}, "t", "x", None, None, True, lambda *_: None)
    assert "provenance" in json.loads(capsys.readouterr().out)


def test_a_record_already_there_is_kept():
    res = {"provenance": {"backfilled": "x"}}
    assert with_provenance(res) is res
