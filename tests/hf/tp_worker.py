"""One rank of the tensor-parallel tests, started by ``torchrun`` from test_tensor_parallel.py (not a test module).

``python tp_worker.py SPEC OUT``: loads SPEC's model sharded by transformers' plan, decodes SPEC's prompt with each
decoder it names over codebooks found as SPEC says, and writes what it saw to ``OUT/rank<r>.json``: the tokens
of each decoder, the weights digest, and the error a decoder refused with (if one did).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def codebooks_for(model, spec):
    from a2ats.core.codebook import Codebooks, CodebookSettings
    from a2ats.hf.calibrate import load_or_calibrate

    if spec.get("codebooks"):
        return Codebooks.load(spec["codebooks"])
    # the cache, as `a2ats generate` without --codebooks looks it up; never calibrates here (no tokenizer)
    return load_or_calibrate(model, None, None, CodebookSettings(**spec["settings"]), log=lambda *_: None)


def decode(model, codebooks, spec, name: str) -> tuple[list[int], list[tuple[list[float], list[int]]]]:
    """The greedy tokens of decoder ``name``, and each step's top five logits (values, token ids)."""
    from a2ats import A2ATS, A2ATSConfig
    from a2ats.runtime import Engine

    ids = torch.tensor([spec["prompt"]])
    n = spec["new_tokens"]
    if name == "engine":
        # fp32 prefill: a bf16 prefill rounds each rank's partial o/down products before they are summed
        out = Engine(model, codebooks, A2ATSConfig(), prefill_dtype="model").generate(ids, max_new_tokens=n,
                                                                                     keep_logits=True)
        tokens, logits = out.tokens[0, : out.new_tokens[0]].tolist(), [x[0] for x in out.logits]
    else:
        with A2ATS(model, codebooks, A2ATSConfig(), path=name):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 min_new_tokens=n, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        tokens, logits = out.sequences[0, ids.shape[1]:].tolist(), [x[0] for x in out.scores]
    top = [(t.values.tolist(), t.indices.tolist()) for t in (x.float().topk(5) for x in logits)]
    return tokens, top


@torch.inference_mode()
def main(spec_path: str, out: str) -> None:
    from a2ats.core.codebook import weights_digest
    from a2ats.core.distributed import rank
    from a2ats.hf import tp

    torch.set_num_threads(1)  # the ranks share the machine's cores
    spec = json.loads(Path(spec_path).read_text())
    tp.start("cpu")
    res: dict = {}
    try:
        model = tp.load_sharded(spec["model"])
        res["digest"] = weights_digest(model)
        cb = codebooks_for(model, spec)
        seen = {name: decode(model, cb, spec, name) for name in spec["decoders"]}
        res["tokens"] = {name: t for name, (t, _) in seen.items()}
        res["top"] = {name: top for name, (_, top) in seen.items()}
        if spec.get("missing"):  # codebook settings not in the cache: looked up, never calibrated
            codebooks_for(model, {"settings": spec["missing"]})
    except ValueError as e:  # the refusals under test (CodebookError, TensorParallelError)
        res["error"] = f"{type(e).__name__}: {e}"
    Path(out, f"rank{rank()}.json").write_text(json.dumps(res))
    tp.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
