"""One readable forward of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3), on the HF model's weights.

The arithmetic is transformers' own (same RMSNorm, rotary module, projections); what changes is the
bookkeeping around it: q/k/v and gate/up run as one matmul each, and attention is a callback, so the
runner decides per layer and step how to attend. The HF modules' weights are re-pointed at views of
the fused tensors, so no weight is held twice and ``model.generate`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from a2ats.core.distributed import full, kv_heads_held, local
from a2ats.core.support import check_supported
from a2ats.kernels import rope
from a2ats.kernels import weights as packed_weights
from a2ats.kernels.cpu import native_bf16
from a2ats.runtime import tp

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DECODE_WEIGHTS = ("auto", "model", *packed_weights.FORMATS)
# "auto": int8, the fastest format whose perplexity stays within 1% of the model's own on both our models
# (docs/bench/speed/README.md); a model not in float32 keeps its own weights (the kernels do fp32 math).
AUTO_FORMAT = "int8"
# The runtime encodes decode keys late, from their pre-RoPE copies (see Runner.begin_decode): a codebook of post-RoPE
# keys would get wrong codes, so it is refused by name.
POST_ROPE_REFUSAL = ("post-RoPE codebooks (the a2ats-postrope ablation) run on the transformers path only, which encodes "
                     "each key as it is written: use a2ats.hf.A2ATS(model, codebooks, path='reference') or `--path reference`")
PREFILL_DTYPES = ("auto", "model", "bf16")
PACKED_MAX_ROWS = 16  # rows (batch x tokens) up to which a step reads the compact weight copies


@dataclass
class LayerWeights:
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    o_bias: torch.Tensor | None  # Llama's attention_bias adds one to o_proj too
    gate_up_bias: torch.Tensor | None  # Llama's mlp_bias
    down_bias: torch.Tensor | None
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3 normalizes q and k per head
    k_norm: torch.Tensor | None
    packed: dict[str, packed_weights.PackedWeight] | None = None  # decode copies of qkv, o, gate_up, down


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears on the same input; the modules then view into it."""
    weight = torch.cat([m.weight.detach() for m in linears], 0).contiguous()
    has_bias = [m.bias is not None for m in linears]
    bias = torch.cat([m.bias.detach() for m in linears], 0).contiguous() if all(has_bias) else None
    if any(has_bias) and bias is None:
        raise ValueError("some but not all of the fused projections have a bias")
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start : start + rows]
        if bias is not None:
            m.bias.data = bias[start : start + rows]
        start += rows
    return weight, bias


def _fuse_parts(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_fuse` of a tensor-parallel rank's shards. The modules keep their sharded weights (transformers'
    forward needs them): the fused shards are a second copy of this rank's part."""
    weight = torch.cat([local(m.weight) for m in linears], 0).contiguous()
    has_bias = [m.bias is not None for m in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("some but not all of the fused projections have a bias")
    return weight, torch.cat([local(m.bias) for m in linears], 0).contiguous() if all(has_bias) else None


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else local(linear.bias)  # o/down biases: replicated, whole


def _norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


class LeanModel:
    """Weights and shapes of a supported HF causal LM, and :meth:`forward` over them."""

    def __init__(self, model: nn.Module, decode_weights: str = "auto", prefill_dtype: str = "auto"):
        """``decode_weights``: what decode steps of a float32 model read for the projections and the LM head,
        with fp32 math in every case (:mod:`a2ats.kernels.weights`): ``"model"`` (the fp32 weights),
        ``"bf16"``, ``"int8"`` or ``"int4"`` copies, or ``"auto"`` (int8). A decode step reads every weight
        once for a few rows, so fewer bytes make it faster; the formats' perplexity cost is measured in
        ``a2ats bench weights``. Prefill keeps the model's weights. The copies cost memory (int8: a
        quarter of the fp32 model). ``prefill_dtype="bf16"``: prefill projections of a float32 model in bf16
        (autocast; fp32 attention, norms and residuals), ``"model"``: in its dtype, ``"auto"``: bf16 where the
        CPU multiplies bf16 natively (AVX-512 BF16 or AMX)."""
        if prefill_dtype not in PREFILL_DTYPES:
            raise ValueError(f"prefill_dtype must be one of {PREFILL_DTYPES}, got {prefill_dtype!r}")
        if decode_weights not in DECODE_WEIGHTS:
            raise ValueError(f"decode_weights must be one of {DECODE_WEIGHTS}, got {decode_weights!r}")
        arch = type(model).__name__
        if arch not in SUPPORTED:
            raise ValueError(
                f"the lean engine supports {', '.join(SUPPORTED)}; got {arch}. "
                "Use the transformers path instead (a2ats.hf.A2ATS, or `a2ats generate --path reference`)."
            )
        cfg = model.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"the lean engine implements SiLU-gated MLPs; {arch} uses {cfg.hidden_act}")
        check_supported(model)  # sliding windows, learned sinks, length-dependent RoPE: refused by name
        core = model.model
        self.config = cfg
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        attn0 = core.layers[0].self_attn
        self.head_dim = getattr(attn0, "head_dim", None) or self.hidden // self.heads
        self.scaling = float(getattr(attn0, "scaling", self.head_dim**-0.5))
        # Under transformers' tensor-parallel plan this rank computes a block of the heads (:mod:`.tp`): the counts
        # below are its own, ``kv_slice`` says which of the model's KV heads they are (codebooks are per head).
        self.kv_slice = kv_heads_held(model)
        self.sharded = self.kv_slice != slice(0, self.kv_heads)
        local_kv = self.kv_slice.stop - self.kv_slice.start
        self.heads, self.kv_heads = self.heads // self.kv_heads * local_kv, local_kv
        self.group = tp.part(attn0.o_proj.weight).group  # the ranks whose partial products are summed
        if self.sharded and self.group is None:
            raise ValueError("the lean engine runs transformers' tensor-parallel plan (tp_plan='auto': o_proj and "
                             "down_proj by input columns); this model's key heads are sharded but its o_proj is not")
        self.embed = full(core.embed_tokens.weight)  # replicated: a sharded embedding is gathered once
        self.norm, self.norm_eps = local(core.norm.weight), _norm_eps(core.norm)
        head = tp.part(model.lm_head.weight)  # by vocabulary rows, or whole
        self.lm_head, self.vocab_group, self.vocab = head.local, head.group, model.lm_head.weight.shape[0]
        self.rotary = core.rotary_emb
        self.eps = _norm_eps(core.layers[0].input_layernorm)
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        if decode_weights == "auto":
            decode_weights = AUTO_FORMAT if self.dtype == torch.float32 else "model"
        if decode_weights != "model" and self.dtype != torch.float32:
            raise ValueError(f"decode_weights={decode_weights!r} is for float32 models (the kernels do fp32 math); "
                             f"this one is {self.dtype}: load it in float32 or use decode_weights='model'")
        self.decode_weights = decode_weights
        on_cpu = self.device.type == "cpu"
        if prefill_dtype == "auto":
            prefill_dtype = "bf16" if self.dtype == torch.float32 and on_cpu and native_bf16() else "model"
        if prefill_dtype == "bf16" and (self.dtype != torch.float32 or not on_cpu):
            raise ValueError(f"prefill_dtype='bf16' lowers a float32 model on the CPU; this one is {self.dtype} on "
                             f"{self.device}: use prefill_dtype='model'")
        self.prefill_dtype = prefill_dtype
        self.layers: list[LayerWeights] = []
        fuse = _fuse_parts if self.sharded else _fuse
        for layer in core.layers:
            a, m = layer.self_attn, layer.mlp
            qkv, qkv_bias = fuse([a.q_proj, a.k_proj, a.v_proj])
            gate_up, gate_up_bias = fuse([m.gate_proj, m.up_proj])
            qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
            self.layers.append(LayerWeights(
                qkv=qkv, qkv_bias=qkv_bias, o=local(a.o_proj.weight), gate_up=gate_up,
                down=local(m.down_proj.weight), o_bias=_bias(a.o_proj), gate_up_bias=gate_up_bias,
                down_bias=_bias(m.down_proj), in_norm=local(layer.input_layernorm.weight),
                post_norm=local(layer.post_attention_layernorm.weight),
                q_norm=None if qn is None else local(qn.weight), k_norm=None if kn is None else local(kn.weight),
            ))
            if decode_weights != "model":
                w = self.layers[-1]
                w.packed = {"qkv": packed_weights.pack(w.qkv, decode_weights),
                            "gate_up": packed_weights.pack(w.gate_up, decode_weights),
                            # by input columns under tensor parallelism: quantized as the whole weight (:mod:`.tp`)
                            "o": tp.packed(a.o_proj.weight, decode_weights),
                            "down": tp.packed(m.down_proj.weight, decode_weights)}
                w.packed = {k: packed_weights.for_kernel(p) for k, p in w.packed.items()}
        self.lm_head_packed = None
        if decode_weights != "model":
            self.lm_head_packed = packed_weights.for_kernel(packed_weights.pack(self.lm_head, decode_weights))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, t, rot) in the model's dtype from the model's own rotary module (any rope type)."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        return self.rotary(probe, positions)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Callable, last_only: bool = True,
                timer=None) -> torch.Tensor:
        """Logits for ``ids`` (B, t) at ``positions`` (B, t); ``attend(layer, q_pre, q, k_pre, k, v)`` gets
        (B, H, t, d) tensors (q/k post-RoPE) and returns the attention output (B, t, H·d)."""
        p = self.begin(ids, positions)
        self.run_layers(p, attend, timer=timer)
        return self.logits(p, last_only, timer)

    def begin(self, ids: torch.Tensor, positions: torch.Tensor) -> Pass:
        """A forward of ``ids`` at ``positions`` before its first layer: :meth:`run_layers` moves it on, as many
        layers at a time as the caller likes (a long prompt chunk goes through the model between decode steps),
        :meth:`logits` ends it. The arithmetic is the same however the layers are split."""
        cos, sin = self.rope(positions)
        return Pass(F.embedding(ids, self.embed), cos.unsqueeze(1), _signed(sin.unsqueeze(1)))

    def run_layers(self, p: Pass, attend: Callable, layers: int | None = None, timer=None) -> None:
        """The next ``layers`` layers of ``p`` (None: all it has left)."""
        stop = self.num_layers if layers is None else min(self.num_layers, p.layer + layers)
        B, t, _ = p.x.shape
        small = self.lm_head_packed is not None and B * t <= PACKED_MAX_ROWS
        lowered = self.prefill_dtype == "bf16" and B * t > PACKED_MAX_ROWS
        Hq, Hkv, d = self.heads, self.kv_heads, self.head_dim

        def linear(x, w: LayerWeights, name: str, bias=None, norm=None, gated=False, residual=None):
            """``prepare(x) @ weight.T + bias + residual``: a decode step's norm, gate and residual add run inside
            the packed weights' kernel (one call: the ops' dispatch outweighed their arithmetic)."""
            if small:
                return packed_weights.linear(x, w.packed[name], bias, norm=norm, eps=self.eps, gated=gated,
                                             residual=residual)
            x = packed_weights.prepare(x, norm, self.eps, gated)
            if lowered:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = F.linear(x, getattr(w, name), bias).float()
            else:
                y = F.linear(x, getattr(w, name), bias)
            return y if residual is None else residual + y

        def summed(x, w: LayerWeights, name: str, bias, residual, gated=False):
            """o and down, added to the residual stream: the ranks' partial products summed first."""
            if self.group is None:
                return linear(x, w, name, bias, gated=gated, residual=residual)
            y = tp.all_reduce(linear(x, w, name, gated=gated), self.group)
            return residual + (y if bias is None else y + bias)

        x, cos, sin = p.x, p.cos, p.sin
        for i in range(p.layer, stop):
            w = self.layers[i]
            qkv = linear(x, w, "qkv", w.qkv_bias, norm=w.in_norm)
            if w.q_norm is None:  # q and k rotate as one tensor: half the ops
                qk = qkv[..., : (Hq + Hkv) * d].view(B, t, Hq + Hkv, d)
            else:
                q, k = qkv[..., : Hq * d].view(B, t, Hq, d), qkv[..., Hq * d : (Hq + Hkv) * d].view(B, t, Hkv, d)
                qk = torch.cat([F.rms_norm(q, (d,), w.q_norm, self.eps), F.rms_norm(k, (d,), w.k_norm, self.eps)], 2)
            qk_pre = qk.transpose(1, 2)
            qk_rot = rope(qk_pre, cos, sin)
            v = qkv[..., (Hq + Hkv) * d :].view(B, t, Hkv, d).transpose(1, 2)
            if timer is not None:
                timer.lap("weights")
            out = attend(i, qk_pre[:, :Hq], qk_rot[:, :Hq], qk_pre[:, Hq:], qk_rot[:, Hq:], v)
            x = summed(out, w, "o", w.o_bias, x)
            gate_up = linear(x, w, "gate_up", w.gate_up_bias, norm=w.post_norm)
            x = summed(gate_up, w, "down", w.down_bias, x, gated=True)
        p.x, p.layer = x, stop

    def logits(self, p: Pass, last_only: bool = True, timer=None) -> torch.Tensor:
        """The logits of a pass through every layer (the last position's only, ``last_only``)."""
        if not p.done(self.num_layers):
            raise RuntimeError(f"the pass is at layer {p.layer} of {self.num_layers}: run its layers first")
        x = p.x[:, -1:] if last_only else p.x
        x = F.rms_norm(x, (self.hidden,), self.norm, self.norm_eps)
        small = self.lm_head_packed is not None and p.x.shape[0] * p.x.shape[1] <= PACKED_MAX_ROWS
        logits = packed_weights.linear(x, self.lm_head_packed) if small else F.linear(x, self.lm_head)
        if self.vocab_group is not None:
            logits = tp.gather_last(logits, self.vocab_group, self.vocab)
        if timer is not None:
            timer.lap("weights")
        return logits


@dataclass
class Pass:
    """A forward part-way through the layers: the hidden states after ``layer`` layers, and the rotary tables."""

    x: torch.Tensor  # (B, t, hidden)
    cos: torch.Tensor
    sin: torch.Tensor  # rotate_half's sign applied (_signed)
    layer: int = 0  # layers done

    def done(self, layers: int) -> bool:
        return self.layer >= layers

    def split(self, at: int) -> tuple[Pass, Pass]:
        """Its first ``at`` positions and the rest, each at this layer. Attention is causal, so the first part may
        go through the remaining layers alone and the rest after it (reading the first part's K/V): the same
        result as going on whole, in two smaller forwards."""
        cut = slice(None, at), slice(at, None)
        return tuple(Pass(self.x[:, c], self.cos[:, :, c], self.sin[:, :, c], self.layer) for c in cut)


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated: rotate_half's sign, applied once per forward."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
