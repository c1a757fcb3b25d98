"""Calibration: run the model densely over the offline corpus, accumulate H and collect pre-RoPE keys,
then fit one query-aware codebook per layer per KV head (DESIGN.md §1.2).

Two stages so that ablations share one forward pass: :func:`record` (streaming: H is a running
d x d sum per KV head; queries are never kept) and :func:`fit`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .attention import dense
from .assets import cache_dir
from .codebook import Codebooks, CodebookSettings, fingerprint_id, model_fingerprint, weights_digest
from .corpus import calibration_sequences
from .hf import ModelPatch
from .rope import WRoPE, undo_rotation


@dataclass
class Recording:
    """What calibration keeps of the forward pass: per layer, H (Hkv, d, d) and the pre-RoPE keys (Hkv, N, d)."""

    h: list[torch.Tensor]
    keys: list[torch.Tensor]
    tokens: int
    seconds: float
    fingerprint: dict = field(default_factory=dict)
    digest: str = ""
    post_rope: bool = False
    band_ratio: float | None = None


class _Recorder(ModelPatch):
    def __init__(self, model, wrope_distance: int, post_rope: bool = False, band_ratio: float | None = None):
        super().__init__(model)
        self.wrope = WRoPE(self.rotary, wrope_distance, band_ratio)
        # banded WRoPE: H pools the query rotated to every band's distance up to the model's context
        self.bands = self.wrope.bands_for(getattr(model.config, "max_position_embeddings", None) or 32768)
        self.post_rope = post_rope
        self.h: list[torch.Tensor | None] = [None] * self.num_layers
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]

    def attention(self, module, query, key, value, mask, scaling, dropout, kwargs):
        (cos, sin), _ = self._current
        layer = module.layer_idx
        B, Hq, n, d = query.shape
        Hkv = key.shape[1]
        if self.post_rope:  # ablation: quantize keys as attention sees them, score with the true query
            q, k = query.float(), key.float()
        else:  # H of the pre-RoPE queries; the WRoPE rotations are applied once, in :meth:`wrope_h`
            q, k = undo_rotation(query, cos, sin), undo_rotation(key, cos, sin)
        q = q.reshape(B, Hkv, -1, d)  # the group's heads pooled
        h = torch.einsum("bhnd,bhne->hde", q, q).to(torch.float64).cpu()
        self.h[layer] = h if self.h[layer] is None else self.h[layer] + h
        # fp16 halves the memory of the keys held for k-means; its precision is far below the VQ error.
        self.keys[layer].append(k.transpose(0, 1).reshape(Hkv, B * n, d).to("cpu", torch.float16))
        return dense(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)

    def wrope_h(self) -> list[torch.Tensor]:
        """H of the WRoPE queries, sum over bands of A_i^T H0 A_i: the rotation (scaled, for YaRN) is linear,
        ``query(q) = A_i^T q``, so rotating H once equals rotating every query (and costs d^3, not n d^2)."""
        if self.post_rope:
            return self.h
        eye = torch.eye(self.h[0].shape[-1])
        rots = [self.wrope.query(eye, i).to(torch.float64) for i in range(self.bands)]  # row j: query(e_j) = A^T e_j
        return [sum(a.T @ h @ a for a in rots) for h in self.h]


@torch.inference_mode()
def record(
    model,
    sequences: list[torch.Tensor],
    wrope_distance: int = 2048,
    progress: bool = True,
    post_rope: bool = False,
    band_ratio: float | None = None,
) -> Recording:
    """Dense forward passes over ``sequences``; returns H and pre-RoPE keys of every layer
    (post-RoPE keys and H of the true queries with ``post_rope``, for that ablation)."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    base = getattr(model, model.base_model_prefix, model)  # skip the LM head: logits are not needed
    with _Recorder(model, wrope_distance, post_rope, band_ratio) as rec:
        for seq in tqdm(sequences, desc="calibration forward", unit="seq", disable=not progress):
            base(input_ids=seq.view(1, -1).to(device), use_cache=False)
    keys = [torch.cat(k, dim=1) for k in rec.keys]
    return Recording(
        h=rec.wrope_h(),
        keys=keys,
        tokens=sum(len(s) for s in sequences),
        seconds=time.perf_counter() - t0,
        fingerprint=model_fingerprint(model.config),
        digest=weights_digest(model),
        post_rope=post_rope,
        band_ratio=band_ratio,
    )


def fit(recording: Recording, settings: CodebookSettings, progress: bool = True) -> Codebooks:
    """Fit every layer's codebooks (the KV heads of a layer together) from a recording."""
    if recording.post_rope != settings.post_rope:
        raise ValueError("the recording's key space (pre/post RoPE) differs from the settings' post_rope")
    if not settings.post_rope and recording.band_ratio != settings.wrope_band_ratio:
        raise ValueError(
            f"the recording pooled H for WRoPE band ratio {recording.band_ratio}, the settings ask for "
            f"{settings.wrope_band_ratio}: record again with the settings' band ratio"
        )
    t0 = time.perf_counter()
    cents, chols, iters = [], [], []
    n_tokens = recording.keys[0].shape[1]
    if settings.n_centroids > n_tokens:
        raise ValueError(
            f"{settings.n_centroids} centroids need at least as many calibration tokens, got {n_tokens}: "
            "use more tokens or fewer centroids"
        )
    for layer in tqdm(range(len(recording.keys)), desc="k-means per layer", unit="layer", disable=not progress):
        c, l, info = Codebooks.fit_layer(recording.keys[layer], recording.h[layer], settings)
        cents.append(c)
        chols.append(l)
        iters.append(info["iterations"])
    info = {
        "calibration_tokens": recording.tokens,
        "forward_seconds": round(recording.seconds, 1),
        "fit_seconds": round(time.perf_counter() - t0, 1),
        "lloyd_iterations_mean": sum(iters) / len(iters),
    }
    return Codebooks(torch.stack(cents), torch.stack(chols), recording.fingerprint, settings, recording.digest, info)


def calibrate(model, tokenizer, settings: CodebookSettings | None = None, progress: bool = True) -> Codebooks:
    """Build codebooks for ``model`` from the built-in offline corpus."""
    settings = settings or CodebookSettings()
    max_pos = getattr(model.config, "max_position_embeddings", None)
    seq_len = min(settings.seq_len, max_pos) if max_pos else settings.seq_len
    seqs = calibration_sequences(tokenizer, settings.text_tokens, settings.uuid_tokens, seq_len, settings.seed)
    rec = record(model, seqs, settings.wrope_distance, progress, settings.post_rope, settings.wrope_band_ratio)
    return fit(rec, settings, progress)


def default_codebook_path(model, settings: CodebookSettings) -> Path:
    """Where codebooks for this checkpoint and these settings are cached."""
    key = fingerprint_id({**model_fingerprint(model.config), "digest": weights_digest(model)})
    name = str(getattr(model.config, "_name_or_path", "") or "model").rstrip("/").split("/")[-1] or "model"
    return cache_dir() / "codebooks" / f"{name}-{key}" / f"{settings.tag}.safetensors"


def load_or_calibrate(
    model, tokenizer, path: str | Path | None = None, settings: CodebookSettings | None = None, log=print
) -> Codebooks:
    """Codebooks from ``path`` (a file, or a folder holding ``<settings tag>.safetensors``), or the cache;
    calibrated and saved there first when absent. A file that exists but does not fit is an error, never overwritten."""
    settings = settings or CodebookSettings()
    if path is None:
        file = default_codebook_path(model, settings)
    else:
        path = Path(path)
        file = path / f"{settings.tag}.safetensors" if path.is_dir() or not path.suffix else path
    if file.exists():
        cb = Codebooks.load(file)
        cb.check_compatible(model, origin=f"codebooks in {file}")
        return cb
    log(f"no codebooks at {file}: calibrating ({settings.n_centroids} centroids per layer per KV head, "
        f"{settings.text_tokens} text + {settings.uuid_tokens} UUID tokens); this happens once")
    cb = calibrate(model, tokenizer, settings)
    cb.save(file)
    log(f"saved codebooks to {file} (forward {cb.info['forward_seconds']} s, k-means {cb.info['fit_seconds']} s)")
    return cb
