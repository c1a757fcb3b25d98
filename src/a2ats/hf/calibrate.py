"""Calibration: run the model densely over the offline corpus, accumulate H and collect pre-RoPE keys,
then fit one query-aware codebook per layer per KV head (docs/design.md §1.2).

Two stages so that ablations share one forward pass: :func:`record` (streaming: H is a running
d x d sum per KV head; queries are never kept) and :func:`fit`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from a2ats import kernels
from a2ats.assets.corpus import calibration_sequences, prompt_start
from a2ats.assets.models import cache_dir
from a2ats.core.codebook import (
    CodebookError,
    Codebooks,
    CodebookSettings,
    fingerprint_id,
    model_fingerprint,
    weights_digest,
)
from a2ats.core.distributed import head_counts, kv_heads_held, rank
from a2ats.core.kmeans import EXACT_LAST, nearest_all
from a2ats.core.rope import WRoPE, undo_rotation
from a2ats.hf.patch import ModelPatch, check_rotary_layout, dense
from a2ats.hf.precision import autocast, full_precision
from a2ats.hf.progress import CalibrationProgress


@dataclass
class Recording:
    """What calibration keeps of the forward pass: per layer, H (Hkv, d, d) and the pre-RoPE keys (Hkv, N, d).

    ``h`` is H for ``band_ratio``; ``h_bands`` holds it for every WRoPE band ratio recorded (one forward serves
    the paper's codebook, the Euclidean ablation and banded WRoPE alike: they share keys and pre-RoPE queries)."""

    h: list[torch.Tensor]
    keys: list[torch.Tensor]
    tokens: int
    seconds: float
    fingerprint: dict = field(default_factory=dict)
    digest: str = ""
    post_rope: bool = False
    band_ratio: float | None = None
    h_bands: dict = field(default_factory=dict)  # band ratio (None: the single distance) -> per-layer H

    def h_for(self, band_ratio: float | None) -> list[torch.Tensor]:
        if self.post_rope:
            return self.h
        if band_ratio not in self.h_bands:
            raise ValueError(
                f"the recording pooled H for WRoPE band ratio(s) {sorted(self.h_bands, key=str)}, the settings ask "
                f"for {band_ratio}: record again with the settings' band ratio"
            )
        return self.h_bands[band_ratio]


class _Recorder(ModelPatch):
    def __init__(self, model, wrope_distance: int, post_rope: bool = False):
        super().__init__(model)
        self.distance = wrope_distance
        # banded WRoPE: H pools the query rotated to every band's distance up to the model's context
        self.max_pos = getattr(model.config, "max_position_embeddings", None) or 32768
        self.post_rope = post_rope
        self.h: list[torch.Tensor | None] = [None] * self.num_layers
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]

    def attention(self, module, query, key, value, mask, scaling, dropout, kwargs):
        (cos, sin), _ = self._current
        layer = module.layer_idx
        B, Hq, n, d = query.shape
        Hkv = key.shape[1]
        with full_precision(query.device):  # H is a sum over many tokens: fp32 even under a bf16 forward
            q32, k32 = query.float(), key.float()  # (the attention below keeps the forward's own dtypes)
            if self.post_rope:  # ablation: quantize keys as attention sees them, score with the true query
                q, k = q32, k32
            else:  # H of the pre-RoPE queries; the WRoPE rotations are applied once, in :meth:`wrope_h`
                q, k = undo_rotation(q32, cos.float(), sin.float()), undo_rotation(k32, cos.float(), sin.float())
            q = q.reshape(B, Hkv, -1, d)  # the group's heads pooled
            h = torch.einsum("bhnd,bhne->hde", q, q).to(torch.float64).cpu()
            self.h[layer] = h if self.h[layer] is None else self.h[layer] + h
            # fp16 halves the memory of the keys held for k-means; its precision is far below the VQ error.
            self.keys[layer].append(k.transpose(0, 1).reshape(Hkv, B * n, d).to("cpu", torch.float16))
        return dense(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)

    def wrope_h(self, band_ratio: float | None) -> list[torch.Tensor]:
        """H of the WRoPE queries, sum over bands of A_i^T H0 A_i: the rotation (scaled, for YaRN) is linear,
        ``query(q) = A_i^T q``, so rotating H once equals rotating every query (and costs d^3, not n d^2)."""
        if self.post_rope:
            return self.h
        wrope = WRoPE(self.rotary, self.distance, band_ratio)
        eye = torch.eye(self.h[0].shape[-1])
        rots = [wrope.query(eye, i).to(torch.float64) for i in range(wrope.bands_for(self.max_pos))]  # row j: A^T e_j
        return [sum(a.T @ h @ a for a in rots) for h in self.h]


@torch.inference_mode()
def record(
    model,
    sequences: list[torch.Tensor],
    wrope_distance: int = 2048,
    progress: bool | CalibrationProgress = True,
    post_rope: bool = False,
    band_ratio: float | None = None,
    compute_dtype: torch.dtype | None = None,
    more_band_ratios: tuple = (),
) -> Recording:
    """Dense forward passes over ``sequences``; returns H and pre-RoPE keys of every layer
    (post-RoPE keys and H of the true queries with ``post_rope``, for that ablation). ``compute_dtype``
    (e.g. bf16) runs the projections under autocast: about twice as fast on CPUs with bf16 instructions.
    ``more_band_ratios``: H for these WRoPE band ratios too, from the same pass. ``progress``: a bar of its own
    (True), none (False), or a phase of a calibration's bar."""
    check_rotary_layout(model)  # before a forward of ~80K tokens: refuse a model the codebooks would not fit
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    base = getattr(model, model.base_model_prefix, model)  # skip the LM head: logits are not needed
    bar = progress if isinstance(progress, CalibrationProgress) else CalibrationProgress(disable=not progress)
    if bar is not progress:
        bar.plan("forward", "forward", sum(len(s) for s in sequences), "tokens")
    with _Recorder(model, wrope_distance, post_rope) as rec, autocast(device, compute_dtype):
        bar.start("forward")
        for seq in sequences:
            base(input_ids=seq.view(1, -1).to(device), use_cache=False)
            bar.done("forward", len(seq))  # in tokens: sequences of unequal lengths cost unequal time
    if bar is not progress:
        bar.close()
    keys = [torch.cat(k, dim=1) for k in rec.keys]
    h_bands = {} if post_rope else {r: rec.wrope_h(r) for r in dict.fromkeys((band_ratio, *more_band_ratios))}
    return Recording(
        h=rec.h if post_rope else h_bands[band_ratio],
        keys=keys,
        tokens=sum(len(s) for s in sequences),
        seconds=time.perf_counter() - t0,
        fingerprint=model_fingerprint(model.config),
        digest=weights_digest(model),
        post_rope=post_rope,
        band_ratio=band_ratio,
        h_bands=h_bands,
    )


def kernel_nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """k-means assignment by the C++ kernel (:func:`a2ats.kernels.kmeans_nearest`): the exact argmax of x·c - |c|²/2,
    shortlisted with bf16 dot products under a proven bound and decided in fp32 where the CPU has AVX-512 BF16
    (measured 2.6x faster than the fp32 kernel, encode_nearest, per pass over 3 x 81,920 points and 4,096 centroids,
    d = 64, AMD EPYC)."""
    half = 0.5 * (centroids * centroids).sum(-1)
    return kernels.kmeans_nearest(x, centroids, half)


def kmeans_layer_guess(settings: CodebookSettings, kv_heads: int, head_dim: int, points: int) -> float:
    """Seconds one layer's k-means is guessed to take before one is measured (for the progress bar): one timed
    assignment of a small random sample, scaled to the points and to the passes that search every centroid,
    times what the rest of a layer added (seeding, neighbour passes, updates: measured on SmolLM2, AMD EPYC)."""
    x, c = torch.randn(kv_heads, 2048, head_dim), torch.randn(kv_heads, settings.n_centroids, head_dim)
    nearest = kernel_nearest if kernels.cpu_backend() is not None else None  # builds the kernels on a first run
    t = time.perf_counter()
    nearest_all(x, c, nearest)
    per_pass = (time.perf_counter() - t) * points / 2048
    neighbours = 0 < settings.kmeans_neighbours < settings.n_centroids
    return per_pass * ((1 + EXACT_LAST) * 1.8 if neighbours else (settings.max_iter + 1) * 1.1)


def plan_calibration(bar: CalibrationProgress, model, tokens: int, settings: list[CodebookSettings]) -> None:
    """The phases of a calibration on its bar: a forward over ``tokens``, then k-means for each codebook set."""
    fp = model_fingerprint(model.config)
    layers, hkv, d = fp["num_hidden_layers"], fp["num_key_value_heads"], fp["head_dim"]
    bar.plan("forward", "forward", tokens, "tokens")
    for s in settings:
        bar.plan("k-means", "k-means", layers, "layers", guess=kmeans_layer_guess(s, hkv, d, tokens))


def fit(recording: Recording, settings: CodebookSettings, progress: bool | CalibrationProgress = True) -> Codebooks:
    """Fit every layer's codebooks (the KV heads of a layer together) from a recording. ``progress``: a bar of its
    own (True), none (False), or a phase of a calibration's bar."""
    if recording.post_rope != settings.post_rope:
        raise ValueError("the recording's key space (pre/post RoPE) differs from the settings' post_rope")
    h = recording.h_for(settings.wrope_band_ratio)
    cents, chols, iters = [], [], []
    n_tokens = recording.keys[0].shape[1]
    if settings.n_centroids > n_tokens:
        raise ValueError(
            f"{settings.n_centroids} centroids need at least as many calibration tokens, got {n_tokens}: "
            "use more tokens or fewer centroids"
        )
    # the kernel where it builds and the keys are in CPU memory; else torch's chunked matmul (no n x C buffer).
    # Asked before the clock starts: a first use builds the kernels, which is not k-means' time.
    nearest = kernel_nearest if kernels.cpu_backend() is not None and recording.keys[0].device.type == "cpu" else None
    t0 = time.perf_counter()
    bar = progress if isinstance(progress, CalibrationProgress) else CalibrationProgress(disable=not progress)
    if bar is not progress:
        bar.plan("k-means", "k-means", len(recording.keys), "layers")
    bar.start("k-means")
    for layer in range(len(recording.keys)):
        c, l, info = Codebooks.fit_layer(recording.keys[layer], h[layer], settings, nearest=nearest,
                                         seed_picks=kernels.kmeans_pp_picks, among=kernels.kmeans_nearest_among)
        cents.append(c)
        chols.append(l)
        iters.append(info["iterations"])
        bar.done("k-means")
    if bar is not progress:
        bar.close()
    info = {
        "calibration_tokens": recording.tokens,
        "forward_seconds": round(recording.seconds, 1),
        "fit_seconds": round(time.perf_counter() - t0, 1),
        "lloyd_iterations_mean": sum(iters) / len(iters),
    }
    return Codebooks(torch.stack(cents), torch.stack(chols), recording.fingerprint, settings, recording.digest, info)


def for_model(model, settings: CodebookSettings | None = None) -> CodebookSettings:
    """``settings`` (default: the defaults) with the calibration sequence length ``model``'s context implies."""
    return (settings or CodebookSettings()).for_context(getattr(model.config, "max_position_embeddings", None))


def settings_sequences(model, tokenizer, settings: CodebookSettings) -> list[torch.Tensor]:
    """The calibration sequences ``settings`` ask for (length capped at the model's context)."""
    settings = for_model(model, settings)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    seq_len = min(settings.seq_len, max_pos) if max_pos else settings.seq_len
    prefix = prompt_start(tokenizer) if settings.sink_prefix else []
    return calibration_sequences(tokenizer, settings.text_tokens, settings.uuid_tokens, seq_len, settings.seed, prefix)


def refuse_sharded(model, file: Path | None = None) -> None:
    """Calibration needs the whole model in one process (k-means over every KV head's keys): a tensor-parallel rank
    holds a shard, so it is refused, naming the one-process command whose cache every rank then reads."""
    held, hkv = kv_heads_held(model), head_counts(model.config)[1]
    if held == slice(0, hkv):
        return
    where = f"no codebooks at {file}; " if file is not None else ""
    raise CodebookError(
        f"{where}a tensor-parallel run does not calibrate (rank {rank()} holds KV heads {held.start}.."
        f"{held.stop - 1} of {hkv}): build the codebooks once in one process: `a2ats calibrate --model MODEL` (with "
        "the same codebook options) writes them to the cache every rank reads; or calibrate with `--out FILE` and "
        "pass `--codebooks FILE`")


def calibrate(
    model, tokenizer, settings: CodebookSettings | None = None, progress: bool = True, compute_dtype: torch.dtype | None = None
) -> Codebooks:
    """Build codebooks for ``model`` from the built-in offline corpus (forward under ``compute_dtype`` autocast)."""
    refuse_sharded(model)
    check_rotary_layout(model)
    settings = for_model(model, settings)
    seqs = settings_sequences(model, tokenizer, settings)
    with CalibrationProgress(disable=not progress) as bar:  # one bar, one remaining time, over both phases
        plan_calibration(bar, model, sum(len(s) for s in seqs), [settings])
        rec = record(model, seqs, settings.wrope_distance, bar, settings.post_rope, settings.wrope_band_ratio,
                     compute_dtype)
        return fit(rec, settings, bar)


def calibrate_missing(
    model, tokenizer, settings: list[CodebookSettings], compute_dtype: torch.dtype | None = None, log=print
) -> list[Path]:
    """Calibrate, into the cache, every codebook of ``settings`` not there yet, with one forward pass per corpus
    and key space: the paper's, the Euclidean and the banded codebooks share a pass (same keys; H rotated per band
    ratio), post-RoPE codebooks take another. Returns the files written."""
    check_rotary_layout(model)
    todo = {default_codebook_path(model, s): for_model(model, s) for s in settings}
    todo = {path: s for path, s in todo.items() if not path.exists()}
    groups: dict[tuple, list[tuple[Path, CodebookSettings]]] = {}
    for path, s in todo.items():
        corpus = (s.post_rope, s.wrope_distance, s.text_tokens, s.uuid_tokens, s.seq_len, s.sink_prefix, s.seed)
        groups.setdefault(corpus, []).append((path, s))
    written = []
    for group in groups.values():
        first = group[0][1]
        ratios = tuple(dict.fromkeys(s.wrope_band_ratio for _, s in group))
        log(f"calibrating {len(group)} codebook set(s) from one forward pass: {', '.join(s.tag for _, s in group)}")
        seqs = settings_sequences(model, tokenizer, first)
        with CalibrationProgress() as bar:
            plan_calibration(bar, model, sum(len(s) for s in seqs), [s for _, s in group])
            rec = record(model, seqs, first.wrope_distance, bar, first.post_rope, ratios[0], compute_dtype, ratios[1:])
            for path, s in group:
                cb = fit(rec, s, bar)
                cb.save(path)
                written.append(path)
                log(f"saved {path} (forward {cb.info['forward_seconds']} s, shared; k-means {cb.info['fit_seconds']} s)")
    return written


def default_codebook_path(model, settings: CodebookSettings) -> Path:
    """Where codebooks for this checkpoint and these settings are cached."""
    settings = for_model(model, settings)
    key = fingerprint_id({**model_fingerprint(model.config), "digest": weights_digest(model)})
    name = str(getattr(model.config, "_name_or_path", "") or "model").rstrip("/").split("/")[-1] or "model"
    return cache_dir() / "codebooks" / f"{name}-{key}" / f"{settings.tag}.safetensors"


def codebook_file(path: str | Path, settings: CodebookSettings) -> Path:
    """The codebook file ``path`` names for ``settings``: ``path`` itself when it is a file (or ends in a suffix),
    else ``<path>/<settings tag>.safetensors``."""
    path = Path(path)
    return path if names_file(path) else path / f"{settings.tag}.safetensors"


def names_file(path: Path) -> bool:
    """Whether a codebook path names a file (an existing one, or one with a suffix), not a folder of them."""
    return path.is_file() or bool(path.suffix and not path.is_dir())


def check_writable(file: Path) -> None:
    """A clear error, before any work, when ``file`` could not be created: a file where a folder must be, or a
    folder this process may not write."""
    parent = Path(file).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot save codebooks to {file}: {parent} is a file, not a folder; give --codebooks a "
                         "folder or a path ending in .safetensors")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot save codebooks to {file}: {parent} is not writable by this user; give --codebooks "
                         "a folder you can write, or set A2ATS_CACHE")


def load_or_calibrate(
    model, tokenizer, path: str | Path | None = None, settings: CodebookSettings | None = None, log=print,
    compute_dtype: torch.dtype | None = None,
) -> Codebooks:
    """Codebooks from ``path`` (a file, or a folder holding ``<settings tag>.safetensors``), or the cache;
    calibrated and saved there first when absent. A file that exists but does not fit is an error, never overwritten."""
    settings = for_model(model, settings)
    file = default_codebook_path(model, settings) if path is None else codebook_file(path, settings)
    if not file.exists():
        refuse_sharded(model, file)  # every rank sees the same file system: all refuse alike, none calibrates
        check_writable(file)  # before a calibration of minutes, not after it
    if file.exists():
        cb = Codebooks.load(file)
        cb.check_compatible(model, origin=f"codebooks in {file}")
        return cb
    log(f"no codebooks at {file}: calibrating ({settings.n_centroids} centroids per layer per KV head, "
        f"{settings.text_tokens} text + {settings.uuid_tokens} UUID tokens); this happens once")
    cb = calibrate(model, tokenizer, settings, compute_dtype=compute_dtype)
    cb.save(file)
    log(f"saved codebooks to {file} (forward {cb.info['forward_seconds']} s, k-means {cb.info['fit_seconds']} s)")
    return cb
