"""The model assets' one-time conversion (a2ats.assets.models)."""


def test_a_gguf_is_read_once_while_converting(monkeypatch):
    """transformers opens the GGUF for the tokenizer, the config and the weights: inside the conversion's block each
    file is read once, and the reader is gguf's own again after it."""
    import gguf

    from a2ats.assets.models import _gguf_read_once

    made = []

    class Reader:
        def __init__(self, path, mode="r"):
            made.append((path, mode))

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    with _gguf_read_once():
        first = gguf.GGUFReader("/m/a.gguf")
        assert gguf.GGUFReader("/m/a.gguf") is first
        assert gguf.GGUFReader("/m/b.gguf") is not first
    assert made == [("/m/a.gguf", "r"), ("/m/b.gguf", "r")]
    assert gguf.GGUFReader is Reader


def test_the_tensor_name_map_is_built_once_per_architecture_while_converting(monkeypatch):
    """transformers asks gguf for the tensor-name map once per module of the model: inside the block it is built once
    for each (architecture, layers), and gguf's own function is back after it."""
    import gguf

    from a2ats.assets.models import _gguf_read_once

    built = []

    def name_map(arch, n_blocks):
        built.append((arch, n_blocks))
        return {"arch": arch, "blocks": n_blocks}

    monkeypatch.setattr(gguf, "get_tensor_name_map", name_map)
    with _gguf_read_once():
        first = gguf.get_tensor_name_map("llama", 30)
        assert gguf.get_tensor_name_map("llama", 30) is first
        assert gguf.get_tensor_name_map("qwen2", 24) == {"arch": "qwen2", "blocks": 24}
    assert built == [("llama", 30), ("qwen2", 24)]
    assert gguf.get_tensor_name_map is name_map
