"""Query-aware vector quantization of pre-RoPE keys (docs/design.md §1.2): fit, encode, save, load.

One codebook per layer per KV head over the full head_dim. With ``H = E[q~^T q~] = L L^T``
(q~ the WRoPE-rotated query, pooled over the GQA group, RMS-normalized), the score error
``(k - c) H (k - c)^T`` equals ``|kL - cL|^2``, so ordinary k-means on ``z = kL`` minimizes it.
Centroids are kept in key space (for the lookup table) and in the transformed space (for encoding).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from a2ats.core.config import DEFAULT_BAND_RATIO, check_band_ratio
from a2ats.core.distributed import full, is_dtensor
from a2ats.core.kmeans import Nearest, NearestAmong, SeedPicks, kmeans

FORMAT_VERSION = 1


def nearest_centroid(z: torch.Tensor, t: torch.Tensor, half: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """int16 (B, H, n): argmax over c of z[b, h, j] · t[h, c] - half[h, c] (z (B, H, n, d), t (H, C, d), half (H, C)),
    ``chunk`` keys at a time so the n x C similarities are never all held."""
    B, H, n, _ = z.shape
    out = torch.empty(B, H, n, dtype=torch.int16, device=z.device)
    for s in range(0, n, chunk):
        sim = torch.matmul(z[:, :, s : s + chunk], t.transpose(-1, -2).unsqueeze(0)) - half[None, :, None, :]
        out[:, :, s : s + chunk] = sim.argmax(-1).to(torch.int16)
    return out


# The automatic calibration sequence length: a quarter of the model's context, within these bounds (tokens).
AUTO_SEQ_LEN = (2048, 16384)


class CodebookError(ValueError):
    """A codebook file that cannot serve this model or these settings."""


@dataclass(frozen=True)
class CodebookSettings:
    """How a set of codebooks was built. Saved beside the tensors and checked at load."""

    n_centroids: int = 4096
    wrope_distance: int = 2048
    wrope_band_ratio: float | None = DEFAULT_BAND_RATIO  # banded WRoPE (beyond the paper); None: its single distance b
    query_aware: bool = True  # False: plain Euclidean k-means on pre-RoPE keys (an ablation)
    post_rope: bool = False  # True: keys and queries after RoPE, no WRoPE (an ablation; b unused)
    text_tokens: int = 65536
    uuid_tokens: int = 16384
    # Sequences each starting with the token real prompts start with (the attention sink), as the official recipe.
    # None: a quarter of the model's context, 2K to 16K tokens (see :meth:`for_context`): on Qwen2.5-Coder-0.5B
    # (32K) 8K sequences keep the attention mass of 16K ones within 0.001 at 4K-16K, on SmolLM2 (8K) 2K sequences
    # that of 8K ones within 0.002, at a third to a half of the forward's time (docs/bench/speed, first run).
    seq_len: int | None = None
    sink_prefix: bool = True
    max_iter: int = 12
    # Lloyd's middle passes search each key's centroid's 32 nearest centroids, not all (core/kmeans.py): ~3x
    # faster k-means at the paper's 4096 centroids; 0: every pass searches all.
    kmeans_neighbours: int = 32
    tol: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.n_centroids <= 32767:
            raise ValueError(f"n_centroids must be in [2, 32767] (codes are int16), got {self.n_centroids}")
        if self.text_tokens < 0 or self.uuid_tokens < 0 or self.text_tokens + self.uuid_tokens <= 0:
            raise ValueError("calibration needs a positive number of text_tokens + uuid_tokens")
        if self.seq_len is not None and self.seq_len < 16:
            raise ValueError(f"seq_len must be >= 16 (or None: from the model's context), got {self.seq_len}")
        check_band_ratio(self.wrope_band_ratio)
        if self.max_iter < 0 or self.tol < 0:
            raise ValueError("max_iter and tol must be >= 0")
        if self.kmeans_neighbours < 0:
            raise ValueError(f"kmeans_neighbours must be >= 0 (0: every Lloyd pass searches all centroids), got "
                             f"{self.kmeans_neighbours}")

    def for_context(self, context: int | None) -> CodebookSettings:
        """These settings with the sequence length a model of ``context`` tokens calibrates on: ``seq_len`` when
        set, else a quarter of the context between 2K and 16K tokens, never past the context (16K when the
        context is unknown)."""
        if self.seq_len is not None:
            return self
        low, high = AUTO_SEQ_LEN
        auto = high if not context else min(max(context // 4, low), high, context)
        return replace(self, seq_len=auto)

    @property
    def tag(self) -> str:
        """A file-name tag of the settings that change the codes (not the corpus size)."""
        if self.seq_len is None:
            raise ValueError("the calibration sequence length is not set: settings.for_context(model context) first")
        space = "postrope" if self.post_rope else f"b{self.wrope_distance}"
        if self.wrope_band_ratio is not None and not self.post_rope:
            space = f"bands{self.wrope_band_ratio:g}"
        n = self.seq_len
        size = f"{n // 1024}k" if n % 1024 == 0 else str(n)
        # 2K sequences without the sink token (the short recipe) keep the plain file names existing caches hold
        corpus = "" if (n, self.sink_prefix) == (2048, False) else f"-{'s' if self.sink_prefix else ''}{size}"
        return f"c{self.n_centroids}-{space}-{'qa' if self.query_aware else 'euclid'}{corpus}"


def model_fingerprint(config: Any) -> dict[str, Any]:
    """What a codebook depends on in a model's config: architecture, shapes, rotary settings."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rope = getattr(cfg, "rope_parameters", None) or {
        "rope_theta": getattr(cfg, "rope_theta", None),
        **(getattr(cfg, "rope_scaling", None) or {}),
    }
    rope = {k: v for k, v in dict(rope).items() if v is not None}
    return {
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or n_heads,
        "head_dim": head_dim,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "rope": json.loads(json.dumps(rope, sort_keys=True, default=str)),
    }


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of the first and last layers' key projections: tells two checkpoints of one architecture apart.

    Hashed in bf16 so the fp32 and bf16 copies of one checkpoint agree. Under tensor parallelism the hash is of
    the whole projections, gathered once from the ranks (a collective: every rank computes it; then kept on the
    model), so a run on N ranks finds the codebooks one process cached.
    """
    cached = getattr(model, "_a2ats_tp_digest", None)
    if cached is not None:
        return cached
    names = [n for n, _ in model.named_parameters() if n.endswith("k_proj.weight")]
    if not names:
        return ""
    params = dict(model.named_parameters())
    h = hashlib.sha256()
    sharded = False
    for n in (names[0], names[-1]):
        sharded |= is_dtensor(params[n])
        w = full(params[n])
        h.update(w.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    digest = h.hexdigest()[:16]
    if sharded:  # sharded weights are not edited in place: the gather is done once
        model._a2ats_tp_digest = digest
    return digest


def fingerprint_id(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def query_aware_factor(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Cholesky factor L (lower) of the RMS-normalized ``H + eps*I``; H is (..., d, d)."""
    h = h.to(torch.float64)
    h = 0.5 * (h + h.transpose(-1, -2))
    rms = h.pow(2).mean(dim=(-1, -2), keepdim=True).sqrt().clamp_min(1e-30)
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    return torch.linalg.cholesky(h / rms + eps * eye).to(torch.float32)


@dataclass
class Codebooks:
    """Codebooks of every layer and KV head: ``centroids`` (L, Hkv, C, d) in key space, ``chol`` (L, Hkv, d, d)."""

    centroids: torch.Tensor
    chol: torch.Tensor
    fingerprint: dict[str, Any]
    settings: CodebookSettings
    digest: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # calibration facts (time, iterations), informative only

    def __post_init__(self) -> None:
        if self.centroids.dim() != 4 or self.chol.dim() != 4:
            raise CodebookError(f"centroids must be (L, Hkv, C, d) and chol (L, Hkv, d, d); got {tuple(self.centroids.shape)}, {tuple(self.chol.shape)}")
        L, H, C, d = self.centroids.shape
        if tuple(self.chol.shape) != (L, H, d, d):
            raise CodebookError(f"chol shape {tuple(self.chol.shape)} does not match centroids {tuple(self.centroids.shape)}")
        if C != self.settings.n_centroids:
            raise CodebookError(f"file holds {C} centroids but its settings say {self.settings.n_centroids}")
        if not (torch.isfinite(self.centroids).all() and torch.isfinite(self.chol).all()):
            raise CodebookError("codebook holds NaN or inf values: it is corrupt; rebuild it with `a2ats calibrate`")
        self.centroids = self.centroids.to(torch.float32).contiguous()
        self.chol = self.chol.to(torch.float32).contiguous()
        # Encoding space, computed once here, never per step.
        self.transformed = torch.matmul(self.centroids, self.chol).contiguous()
        self._device_cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.first_head = 0  # the global index of the first KV head held (a tensor-parallel rank holds a block)

    @property
    def num_layers(self) -> int:
        return self.centroids.shape[0]

    @property
    def num_kv_heads(self) -> int:
        """KV heads held here: all of the model's, or a rank's block (:meth:`for_heads`)."""
        return self.centroids.shape[1]

    @property
    def heads(self) -> slice:
        """The global KV heads held here."""
        return slice(self.first_head, self.first_head + self.num_kv_heads)

    def for_heads(self, heads: slice) -> Codebooks:
        """The codebooks of the global KV heads ``heads`` only (a tensor-parallel rank's block), addressed by their
        global indices as before; the others' memory is not kept. Sliced, not recomputed: the same numbers."""
        if heads == self.heads:
            return self
        if not (self.first_head <= heads.start < heads.stop <= self.heads.stop):
            raise CodebookError(f"codebooks of KV heads {self.heads.start}..{self.heads.stop - 1} do not hold heads "
                                f"{heads.start}..{heads.stop - 1}")
        part = copy.copy(self)
        rows = slice(heads.start - self.first_head, heads.stop - self.first_head)
        part.centroids, part.chol, part.transformed = (x[:, rows].clone() for x in (self.centroids, self.chol, self.transformed))
        part.first_head, part._device_cache = heads.start, {}
        return part

    # -- fitting ---------------------------------------------------------------------------------------------

    @classmethod
    def fit_layer(
        cls, keys: torch.Tensor, h: torch.Tensor | None, settings: CodebookSettings, nearest: Nearest | None = None,
        seed_picks: SeedPicks | None = None, among: NearestAmong | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Fit one layer: keys (Hkv, N, d) pre-RoPE, h (Hkv, d, d) or None (Euclidean). Returns (centroids, chol, info).
        ``nearest``, ``seed_picks``, ``among``: the k-means assignment, seeding loop and neighbour search (see
        :mod:`a2ats.core.kmeans`)."""
        Hkv, N, d = keys.shape
        keys = keys.to(torch.float32)
        if settings.query_aware:
            if h is None:
                raise ValueError("query-aware fitting needs H")
            chol = query_aware_factor(h)
        else:
            chol = torch.eye(d).expand(Hkv, d, d).contiguous()
        z = torch.bmm(keys, chol)
        res = kmeans(z, settings.n_centroids, max_iter=settings.max_iter, tol=settings.tol, seed=settings.seed,
                     nearest=nearest, seed_picks=seed_picks, neighbours=settings.kmeans_neighbours, among=among)
        # Back to key space: c = c' L^{-1}, i.e. solve c L = c' (L lower-triangular).
        cent = torch.linalg.solve_triangular(chol, res.centroids, upper=False, left=False)
        return cent, chol, {"iterations": res.iterations, "reseeded": res.reseeded}

    # -- encoding --------------------------------------------------------------------------------------------

    def tensors_for(self, layer: int, heads: slice, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(centroids, transformed, chol, half squared norms of transformed) of a layer on ``device``, cached."""
        key = (layer, f"{device}:{heads.start}:{heads.stop}")
        if key not in self._device_cache:
            if not (self.first_head <= heads.start and heads.stop <= self.heads.stop):
                raise CodebookError(f"KV heads {heads.start}..{heads.stop - 1} asked of codebooks that hold heads "
                                    f"{self.heads.start}..{self.heads.stop - 1}")
            rows = slice(heads.start - self.first_head, heads.stop - self.first_head)
            c = self.centroids[layer, rows].to(device)
            t = self.transformed[layer, rows].to(device)
            self._device_cache[key] = (c, t, self.chol[layer, rows].to(device), 0.5 * (t * t).sum(-1))
        return self._device_cache[key]

    def encode_inputs(self, layer: int, k: torch.Tensor, heads: slice | None = None):
        """(z, t, half) of keys (B, Hkv, n, d): the keys in the transformed space, the transformed centroids
        and their half squared norms, whose ``argmax_c z·t_c - half_c`` is each key's code."""
        heads = heads or self.heads
        _, t, chol, half = self.tensors_for(layer, heads, k.device)
        return torch.matmul(k.to(torch.float32), chol.unsqueeze(0)), t, half  # z (B, H, n, d)

    def encode(self, layer: int, k: torch.Tensor, heads: slice | None = None) -> torch.Tensor:
        """Nearest centroid in the transformed space for keys (B, Hkv, n, d): int16 (B, Hkv, n).

        The plain torch computation; decoding encodes through the method (:meth:`a2ats.methods.A2ATSMethod.encode`),
        which runs the same argmax in a kernel (:func:`a2ats.kernels.encode_nearest`)."""
        return nearest_centroid(*self.encode_inputs(layer, k, heads))

    # -- persistence -----------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {
            "format": "a2ats-codebooks",
            "format_version": str(FORMAT_VERSION),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "settings": json.dumps(asdict(self.settings), sort_keys=True),
            "digest": self.digest,
            "info": json.dumps(self.info, sort_keys=True, default=str),
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically: an interrupted save never leaves a half file under the final name."""
        if self.heads != slice(0, self.fingerprint.get("num_key_value_heads", self.num_kv_heads)):
            raise CodebookError("these codebooks hold one tensor-parallel rank's KV heads only: save the whole set")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({"centroids": self.centroids, "chol": self.chol}, str(tmp), metadata=self.metadata())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Codebooks:
        path = Path(path)
        if not path.is_file():
            raise CodebookError(f"no codebook file at {path}: build one with `a2ats calibrate --model MODEL --out {path.parent}`")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CodebookError(
                f"codebook file {path} is corrupt or truncated ({e}); delete it and rebuild it with `a2ats calibrate`"
            ) from None
        if meta.get("format") != "a2ats-codebooks":
            raise CodebookError(f"{path} is a safetensors file but not an a2ats codebook file (no a2ats metadata)")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise CodebookError(
                f"{path} has codebook format {meta.get('format_version')}, this a2ats reads {FORMAT_VERSION}: rebuild it with `a2ats calibrate`"
            )
        missing = {"centroids", "chol"} - tensors.keys()
        if missing:
            raise CodebookError(f"codebook file {path} lacks tensors {sorted(missing)}: it is corrupt; rebuild it")
        try:
            # files from before a field: no sink token; every Lloyd pass over all centroids
            settings = {"sink_prefix": False, "kmeans_neighbours": 0, **json.loads(meta["settings"])}
            settings = CodebookSettings(**settings)
            fp = json.loads(meta["fingerprint"])
            info = json.loads(meta.get("info", "{}"))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CodebookError(f"codebook file {path} has unreadable metadata ({e}): rebuild it") from None
        return cls(tensors["centroids"], tensors["chol"], fp, settings, meta.get("digest", ""), info)

    # -- compatibility -------------------------------------------------------------------------------------

    def check_compatible(
        self, model: torch.nn.Module, wrope_distance: int | None = None, origin: str = "codebooks", band_ratio: float | None | str = "any"
    ) -> None:
        """Raise :class:`CodebookError` naming every mismatch between these codebooks and ``model``."""
        fp = model_fingerprint(model.config)
        diffs = [f"{k}: codebooks {self.fingerprint.get(k)!r} vs model {fp[k]!r}" for k in fp if self.fingerprint.get(k) != fp[k]]
        if diffs:
            raise CodebookError(
                f"{origin} were built for another model ({'; '.join(diffs)}). "
                "Build codebooks for this model with `a2ats calibrate --model PATH`."
            )
        digest = weights_digest(model)
        if self.digest and digest and digest != self.digest:
            raise CodebookError(
                f"{origin} were built for a model of the same architecture but other weights "
                f"(key-projection digest {self.digest} vs {digest}). Build codebooks for this checkpoint with `a2ats calibrate --model PATH`."
            )
        if wrope_distance is not None and wrope_distance != self.settings.wrope_distance:
            raise CodebookError(
                f"{origin} were calibrated for WRoPE distance {self.settings.wrope_distance}, but the config asks "
                f"for {wrope_distance}: use the same distance or recalibrate with `--wrope-distance {wrope_distance}`"
            )
        # post-RoPE codebooks score with the true query: no WRoPE, so any band ratio serves
        if band_ratio != "any" and band_ratio != self.settings.wrope_band_ratio and not self.settings.post_rope:
            def say(r):
                return "the paper's single distance" if r is None else f"bands of ratio {r:g}"

            flag = "with `--wrope-bands 0`" if band_ratio is None else f"with `--wrope-bands {band_ratio:g}`"
            raise CodebookError(
                f"{origin} were calibrated for WRoPE with {say(self.settings.wrope_band_ratio)}, but the config asks "
                f"for {say(band_ratio)}: use the same WRoPE or recalibrate {flag}"
            )
