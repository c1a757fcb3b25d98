"""The Triton selection kernel against the torch reference: identical (idx, count), ties included.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 with CPU tensors). The variable
must be set before triton is first imported: triton decorates its own helpers (tl.sum, tl.cumsum)
then, and an interpreted kernel cannot call compiled ones. It is set at the top of this module, but
conftest imports a2ats, whose torch._dynamo imports triton first; in that case the interpreted tests
are skipped here and run in a child pytest started with the variable set (test_interpreted_in_child).
The variable is restored after import so that other modules (torch.compile on a GPU) never see it.
"""

from __future__ import annotations

import os
import subprocess
import sys

_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from a2ats.kernels import (  # noqa: E402
    reference_score_select,
    score_select,
    triton_available,
    triton_score_select,
)
from a2ats.kernels import triton_score as ts  # noqa: E402

# Whether this process can interpret: triton's helpers were decorated with the variable on.
IN_PROCESS = isinstance(tl.sum, InterpretedFunction)

if _PREVIOUS is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS

interpreted = pytest.mark.skipif(not IN_PROCESS, reason="triton imported before TRITON_INTERPRET=1: run in a child")


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.skipif(IN_PROCESS, reason="the interpreted tests run in this process")
def test_interpreted_in_child():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreted and not child", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert " passed" in out and "skipped" not in out, out  # the child really ran them


def make_case(B, H, G, n, *, C, bands, lengths, ties, seed):
    """LUT, codes (a strided view of a larger int16 buffer), offsets or None, left-padded valid."""
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values, signed zeros and infinities included: ties everywhere
        vals = torch.tensor([-0.0, 0.0, 1.0, -1.0, float("inf"), 2.0])
        lut = vals[torch.randint(0, len(vals), (B, H, G, C * bands), generator=g)]
    else:
        lut = torch.randn(B, H, G, C * bands, generator=g)
    buf = torch.randint(0, C, (B, H, n + 5), generator=g, dtype=torch.int16)
    codes = buf[:, :, 2 : n + 2]
    offsets = torch.randint(0, bands, (B, n), generator=g, dtype=torch.int32) * C if bands > 1 else None
    valid = torch.zeros(B, n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        valid[b, n - length :] = True
    return lut, codes, offsets, valid


def assert_same(got, want):
    assert got[1].dtype == torch.int32 and got[0].dtype == torch.int32
    assert torch.equal(got[1], want[1]), (got[1], want[1])
    assert got[0].shape == want[0].shape, (got[0].shape, want[0].shape)
    assert torch.equal(got[0], want[0])


# (n, Hkv, G, C, bands, ties, lengths per row, [(k per row, sinks, window)], max block)
CASES = [
    (1, 1, 1, 4, 1, False, [1, 0], [([1, 1], 0, 0), ([0, 3], 1, 0)], 1024),
    (7, 3, 2, 3, 2, True, [7, 4, 1], [([2, 0, 9], 0, 0), ([9, 1, 1], 1, 2)], 1024),
    (67, 2, 3, 5, 1, True, [67, 40], [([5, 100], 2, 4), ([0, 3], 0, 0)], 32),
    (67, 1, 8, 40, 2, False, [67, 66, 10], [([10, 3, 100], 4, 8)], 1024),
    (300, 2, 4, 3, 1, True, [300, 123, 1], [([7, 30, 2], 4, 16), ([299, 0, 5], 0, 3)], 128),
    (300, 1, 5, 16, 2, True, [300, 299], [([40, 1], 0, 0)], 1024),
    (1001, 2, 1, 64, 1, False, [1001, 500], [([50, 1000], 8, 64)], 1024),
    (1001, 1, 6, 8, 2, True, [1001, 700, 3], [([100, 5, 1], 3, 10)], 256),
    (2500, 1, 2, 4, 1, True, [2500, 2048], [([333, 2000], 8, 64)], 1024),
]


@interpreted
@pytest.mark.parametrize("case", CASES, ids=[f"n{c[0]}-H{c[1]}-G{c[2]}-C{c[3]}x{c[4]}{'-ties' if c[5] else ''}" for c in CASES])
def test_matches_reference_interpreted(case, monkeypatch, interpreter):
    n, H, G, C, bands, ties, lengths, settings, max_block = case
    monkeypatch.setattr(ts, "_MAX_BLOCK", max_block)  # small blocks: ties ranked across block boundaries
    lut, codes, offsets, valid = make_case(len(lengths), H, G, n, C=C, bands=bands, lengths=lengths, ties=ties, seed=n + G)
    for k, sinks, window in settings:
        k = torch.tensor(k, dtype=torch.long)
        want = reference_score_select(lut, codes, offsets, valid, k, sinks, window)
        assert_same(triton_score_select(lut, codes, offsets, valid, k, sinks, window), want)


@interpreted
def test_edges_interpreted(interpreter):
    assert triton_available()
    lut, codes, offsets, valid = make_case(2, 2, 3, 0, C=4, bands=1, lengths=[0, 0], ties=False, seed=0)
    idx, count = triton_score_select(lut, codes, offsets, valid, torch.tensor([3, 3]), 1, 1)
    assert idx.shape == (2, 2, 0) and torch.equal(count, torch.zeros(2, 2, dtype=torch.int32))
    lut, codes, offsets, valid = make_case(1, 1, 2, 20, C=4, bands=1, lengths=[20], ties=False, seed=1)
    codes = codes.clone()
    codes[0, 0, 3] = 4  # outside the table: an error, as the reference's gather
    with pytest.raises(RuntimeError, match="outside the lookup table"):
        triton_score_select(lut, codes, offsets, valid, torch.tensor([5]), 0, 0)


def test_not_used_on_cpu_tensors(monkeypatch):
    # score_select keeps the C++ kernel (or the reference) on CPU tensors, interpreter or not.
    import a2ats.kernels.ops as ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops, "triton_score_select", lambda *a: pytest.fail("Triton kernel used on CPU tensors"))
    lut, codes, offsets, valid = make_case(1, 1, 1, 10, C=4, bands=1, lengths=[10], ties=False, seed=2)
    k = torch.tensor([3])
    assert_same(score_select(lut, codes, offsets, valid, k, 0, 0), reference_score_select(lut, codes, offsets, valid, k, 0, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(IN_PROCESS, reason="triton's helpers are interpreted in this process: no compiled kernels")
def test_matches_reference_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled kernels, not the interpreter
    dev = torch.device("cuda")
    n = 32768
    for ties, bands, G in [(False, 1, 4), (True, 2, 8)]:
        lut, codes, offsets, valid = make_case(3, 4, G, n, C=4096 if not ties else 8, bands=bands,
                                               lengths=[n, n - 1000, 5000], ties=ties, seed=G)
        args = [t.to(dev) if t is not None else None for t in (lut, codes, offsets, valid)]
        for k, sinks, window in [([983, 100, 40000], 8, 64), ([0, 1, 4000], 0, 0)]:
            k = torch.tensor(k, dtype=torch.long, device=dev)
            want = reference_score_select(*args, k, sinks, window)
            got = triton_score_select(*args, k, sinks, window)
            assert got[0].device.type == "cuda"
            assert_same(tuple(t.cpu() for t in got), tuple(t.cpu() for t in want))
            assert_same(tuple(t.cpu() for t in score_select(*args, k, sinks, window)), tuple(t.cpu() for t in want))
