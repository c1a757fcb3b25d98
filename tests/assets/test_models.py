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
