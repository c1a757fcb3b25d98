"""`a2ats bench project`: the performance model's presets, validation, arithmetic and command line.

Every figure here is a projection; these tests check the model's arithmetic, not the hardware."""

import json
import math

import pytest

from a2ats.bench.project import (
    H100_HOST,
    SHAPES,
    Efficiencies,
    Hardware,
    ModelShape,
    Workload,
    a2ats_max_batch,
    a2ats_step,
    context_projection,
    default_efficiencies,
    full_max_batch,
    full_step,
    local_hardware,
    project,
    render_markdown,
)

GIB = 1024**3


def test_presets_validate_and_have_the_known_sizes():
    llama, smol = SHAPES["llama-3.1-8b"], SHAPES["smollm2-135m"]
    assert llama.group == 4 and smol.group == 3
    assert llama.params == pytest.approx(8.03e9, rel=2e-3)  # Llama-3.1-8B: 8.03 B parameters
    assert smol.params == pytest.approx(134.5e6, rel=5e-3)  # SmolLM2-135M (tied embeddings)
    assert llama.kv_bytes_per_token() == 128 * 1024  # docs/design.md §2.1: 128 KiB of bf16 KV per token
    assert smol.kv_bytes_per_token() == 2 * 30 * 3 * 64 * 2
    assert H100_HOST.host_read_gbps == 95 and H100_HOST.pcie_h2d_gbps == 55 and not H100_HOST.unified
    default_efficiencies()
    Workload()
    # docs/design.md §2.1: a 128K sequence is 16 GiB; 3-4 fit beside the weights on the GPU, ~7 in host RAM.
    wl = Workload()
    assert full_max_batch(llama, H100_HOST, wl, 131072) in (3, 4)
    assert a2ats_max_batch(llama, H100_HOST, wl, 131072) == 7


@pytest.mark.parametrize("make, match", [
    (lambda: Hardware("x", 80, -1.0, 400, 55, 55, 125, 95, 16), "hbm_gbps"),
    (lambda: Hardware("x", 80, 2940, 400, 55, 55, 125, 0.0, 16), "host_read_gbps"),
    (lambda: Hardware("x", 80, 2940, 400, 55, 55, 125, 95, 0), "host_cores"),
    (lambda: Hardware("x", 80, 2940, 400, 55, 55, 125, 95, 16, gpu_reserve_gib=90), "gpu_reserve_gib"),
    (lambda: Workload(rho=0.0), "rho"),
    (lambda: Workload(rho=1.5), "rho"),
    (lambda: Workload(sinks=-1), "sinks"),
    (lambda: Workload(union_inflation=0.5), "union_inflation"),
    (lambda: Efficiencies(host_attention=1.2), "host_attention"),
    (lambda: Efficiencies(gpu_weights=float("nan")), "gpu_weights"),
    (lambda: ModelShape("x", 2, 6, 4, 8, 16, 32, 100), "multiple"),
    (lambda: ModelShape("x", 0, 4, 2, 8, 16, 32, 100), "layers"),
])
def test_invalid_configs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_budget_edge_and_union_bound():
    Workload(rho=1.0)  # every token: allowed
    with pytest.raises(ValueError, match="exceeds the group size"):
        Workload(union_inflation=5.0).rows(1000, 4)
    assert Workload(rho=0.5, union_inflation=4.0).rows(100, 4) == 100  # never more than the context


def test_context_beyond_what_fits_raises():
    with pytest.raises(ValueError, match="fits neither system"):
        context_projection(SHAPES["llama-3.1-8b"], H100_HOST, default_efficiencies(), Workload(), 4_000_000)
    with pytest.raises(ValueError, match="positive integer"):
        context_projection(SHAPES["llama-3.1-8b"], H100_HOST, default_efficiencies(), Workload(), 0)


def test_more_host_bandwidth_never_lowers_a2ats_throughput():
    shape, eff = SHAPES["llama-3.1-8b"], default_efficiencies()
    for wl in (Workload(), Workload(rho=0.015, union_inflation=1.0), Workload(gpu_tier=True)):
        for n in (32768, 131072):
            for b in (1, 2, 5):
                prev = prev_serial = 0.0
                for bw in (10.0, 50.0, 95.0, 200.0, 1000.0, 5000.0):
                    r = a2ats_step(shape, Hardware(**{**H100_HOST.__dict__, "host_read_gbps": bw}), eff, wl, n, b)
                    assert r["tokens_per_s"] >= prev - 1e-9 and r["tokens_per_s_serial"] >= prev_serial - 1e-9
                    assert r["tokens_per_s"] >= r["tokens_per_s_serial"] - 1e-9  # overlap never hurts
                    prev, prev_serial = r["tokens_per_s"], r["tokens_per_s_serial"]


def test_full_attention_batch_limit_drops_with_context():
    shape, wl = SHAPES["llama-3.1-8b"], Workload()
    limits = [full_max_batch(shape, H100_HOST, wl, n) for n in (8192, 16384, 32768, 65536, 131072)]
    assert all(a > b for a, b in zip(limits, limits[1:])), limits
    a2 = [a2ats_max_batch(shape, H100_HOST, wl, n) for n in (32768, 65536, 131072)]
    assert all(a >= b for a, b in zip(a2, a2[1:])) and a2[-1] > limits[-1]


def _tiny():
    shape = ModelShape("tiny", layers=2, q_heads=4, kv_heads=2, head_dim=8, hidden=16, intermediate=32, vocab=100)
    hw = Hardware("tiny", gpu_memory_gib=1.0, hbm_gbps=1.0, gpu_tflops=1000.0, pcie_h2d_gbps=1.0, pcie_d2h_gbps=1.0,
                  host_ram_gib=1.0, host_read_gbps=1.0, host_cores=1, gpu_reserve_gib=0.5, host_reserve_gib=0.5)
    eff = Efficiencies(host_attention=1.0, gpu_weights=1.0, gpu_attention=1.0, gpu_scoring=1.0, gpu_gather=1.0,
                       topk_passes=1.0, host_gflops_per_core=1e6, pcie_latency_us=0.0, step_overhead_ms=0.0)
    wl = Workload(rho=0.1, sinks=4, window=8, union_inflation=1.5, centroids=16)
    return shape, hw, eff, wl


def test_one_row_by_hand():
    shape, hw, eff, wl = _tiny()
    # Parameters per layer: q 16x32 + k,v 2x16x16 + o 32x16 + MLP 3x16x32 = 3072; read per step: 2 layers + LM head.
    assert shape.params_per_layer == 3072
    weights_read = (2 * 3072 + 100 * 16) * 2  # 15,488 bytes
    assert shape.weight_bytes_read == weights_read
    kv_tok = 2 * 2 * 2 * 8 * 2  # K and V x layers x KV heads x d x bf16 = 128 bytes
    n, B = 1000, 2

    f = full_step(shape, hw, eff, wl, n, B)
    t_full = (weights_read + B * n * kv_tok) / 1e9  # 271.488 us at 1 GB/s
    assert f["tokens_per_s"] == pytest.approx(B / t_full, rel=1e-12)
    assert f["bottleneck"] == "GPU memory bandwidth (KV cache)"

    a = a2ats_step(shape, hw, eff, wl, n, B)
    rows = math.ceil(1.5 * 100) + 4 + 8  # union of int(0.1 n) + sinks + window = 162
    assert a["rows_per_kv_head"] == rows
    host = B * rows * 2 * 2 * (2 * 8 * 2) / 1e9  # rows x KV heads x layers x (K+V row bytes) = 41.472 us
    codebooks = 2 * 2 * 16 * 8 * 2  # layers x KV heads x centroids x d x bf16
    weights = (weights_read + codebooks) / 1e9  # 16.512 us
    scoring = B * 2 * (n * 2 * 2 + 1 * 4 * n * 4) / 1e9  # int16 codes + one fp32 score pass: 80 us
    pcie = B * 2 * (4 * 8 * 2 + rows * 2 * 4 + 2 * 2 * 8 * 2) / 1e9  # q + int32 indices + new k/v (D2H) = 5.696 us
    serial = weights + scoring + host + pcie  # 143.68 us
    overlapped = max(2 * weights + scoring, host, pcie)  # two micro-batches read the weights twice: 113.024 us
    assert a["tokens_per_s_serial"] == pytest.approx(B / serial, rel=1e-12)
    assert a["tokens_per_s"] == pytest.approx(B / overlapped, rel=1e-12)
    assert a["tokens_per_s"] == pytest.approx(17695.36, rel=1e-6)
    assert a["bottleneck"] == "GPU memory bandwidth (scoring/top-K)" and a["overlapped"]
    # B = 1 cannot overlap: the serial sum.
    one = a2ats_step(shape, hw, eff, wl, n, 1)
    assert one["tokens_per_s"] == one["tokens_per_s_serial"] and not one["overlapped"]
    # Batch limits: (1 GiB - 0.5 GiB reserve - weights) / KV per sequence.
    assert full_max_batch(shape, hw, wl, 1_000_000) == int((0.5 * GIB - shape.params * 2) // (1_000_000 * kv_tok))


def test_projection_is_labelled_and_serializes():
    shape, eff, wl = SHAPES["llama-3.1-8b"], default_efficiencies(), Workload()
    res = project(shape, H100_HOST, eff, wl, [32768, 131072], measured=[
        {"context": 131072, "batch": 3, "system": "full", "tokens_per_s": 100.0}])
    json.loads(json.dumps(res))
    assert "PROJECTION" in res["label"]
    t = res["target"]
    assert t["context"] == 131072 and t["ratio"] > 0 and isinstance(t["reached"], bool)
    assert res["measured"][0]["projected_tokens_per_s"] > 0 and res["measured"][0]["fits_in_model"]
    names = {v["variant"] for v in res["variants"]}
    assert {"lower effective budget", "GPU free memory as a second KV tier", "compact host layout (8-bit KV)"} <= names
    md = render_markdown(res)
    assert "PROJECTION" in md and "assumption" in md and "Measured beside projected" in md
    for a in res["assumptions"]:  # every input says where it comes from
        assert a["source"] and a["source"] != "given"


def test_cli_prints_json(capsys):
    from a2ats.cli import main

    assert main(["bench", "project", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["shape"]["name"] == "llama-3.1-8b" and res["hardware"]["name"] == "h100-host"
    assert [c["context"] for c in res["contexts"]] == [32768, 65536, 131072]


def test_cli_local_profile_from_a_kernels_json(tmp_path, capsys):
    from a2ats.cli import main

    kj = tmp_path / "kernels.json"
    kj.write_text(json.dumps({"threads": 2.0, "host_read_gbps": 30.0, "attention_gbps": 18.0,
                              "score_select_token_heads_per_s": 1e9, "host_ram_gib": 24.0}))
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"rows": [{"context": 4096, "batch": 1, "system": "a2ats-offload", "tokens_per_s": 20.0,
                                              "ms_per_step": 50.0}]}))  # as `bench throughput --json` writes
    out = tmp_path / "out"
    assert main(["bench", "project", "--hardware", "local", "--kernels-json", str(kj), "--shape", "smollm2-135m",
                 "--contexts", "4096,8192", "--measured", str(measured), "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    hw = res["hardware"]
    assert hw["unified"] and hw["host_read_gbps"] == 30.0 and hw["host_cores"] == 2 and hw["host_ram_gib"] == 24.0
    assert res["efficiencies"]["host_attention"] == pytest.approx(0.6)
    assert res["measured"][0]["measured_over_projected"] > 0 and res["measured"][0]["system"] == "a2ats"
    assert all(v["variant"] != "GPU free memory as a second KV tier" for v in res["variants"])  # no GPU to tier into
    assert json.loads((out / "project.json").read_text())["label"] == res["label"]
    assert "no GPU" in (out / "project.md").read_text()
    # Without a kernels JSON the local profile cannot be built: a clear error, exit status 2.
    assert main(["bench", "project", "--hardware", "local", "--kernels-json", str(tmp_path / "none.json")]) == 2
    assert "needs a `bench kernels --json` result" in capsys.readouterr().err


def test_local_profile_is_unified():
    with pytest.raises(ValueError, match="host_read_gbps"):
        local_hardware({"threads": 2})
    hw = local_hardware({"threads": 2.0, "host_read_gbps": 30.0, "host_ram_gib": 24.0})
    assert hw.unified and hw.hbm_gbps == 30.0 and hw.gpu_memory_gib == 24.0
    r = a2ats_step(SHAPES["smollm2-135m"], hw, default_efficiencies(), Workload(), 8192, 4)
    assert r["ms"]["pcie"] == 0 and not r["overlapped"]  # one memory: nothing crosses PCIe, nothing overlaps
    assert r["tokens_per_s"] == r["tokens_per_s_serial"]


def test_a_context_that_fits_nowhere_is_skipped_beside_ones_that_fit():
    res = project(SHAPES["llama-3.1-8b"], H100_HOST, default_efficiencies(), Workload(), [32768, 4_000_000])
    assert [c["context"] for c in res["contexts"]] == [32768]
    assert res["skipped"][0]["context"] == 4_000_000 and "fits neither" in res["skipped"][0]["reason"]
    with pytest.raises(ValueError, match="fits neither system"):
        project(SHAPES["llama-3.1-8b"], H100_HOST, default_efficiencies(), Workload(), [4_000_000])


def test_paper_host_profile_and_the_bandwidth_by_ram_sweep(capsys):
    """The paper's host is a named profile whose every input says where it comes from; the sweep's ratio never
    falls as the host reads faster or holds more, and the full-attention side does not move with the host."""
    from a2ats.bench.project.inputs import HOSTS, PAPER_HOST
    from a2ats.bench.project.model import sweep
    from a2ats.cli import main

    assert HOSTS["paper-host"] is PAPER_HOST and PAPER_HOST.host_cores == 48
    shape, eff, wl = SHAPES["llama-3.1-8b"], default_efficiencies(), Workload()
    for field in ("host_ram_gib", "host_read_gbps", "gpu_memory_gib"):
        assert PAPER_HOST.sources[field]
    res = sweep(shape, PAPER_HOST, eff, wl, 131072, [95, 240, 960], [125, 1024])
    at = {(c["host_read_gbps"], c["host_ram_gib"]): c["ratio"] for c in res["cells"]}
    assert at[95, 125] <= at[240, 125] <= at[960, 125] and at[240, 125] <= at[240, 1024]
    # the h100-host's ratio is the sweep's cell at its own bandwidth and RAM
    h100 = context_projection(shape, H100_HOST, eff, wl, 131072)["summary"]["ratio_best"]
    assert math.isclose(sweep(shape, PAPER_HOST, eff, wl, 131072, [95], [125])["cells"][0]["ratio"], h100, rel_tol=1e-9)
    assert main(["bench", "project", "--hardware", "paper-host", "--sweep", "--contexts", "131072"]) == 0
    md = capsys.readouterr().out
    assert "paper-host" in md and "## Sweep: host read bandwidth x host RAM at 128K" in md
