"""Prompts that share a prefix share its prefill: K/V rows and their codes kept in blocks of ``block`` tokens,
keyed by a digest of every token up to the block's end, least recently used evicted first under a byte cap.

A prompt's last, partial block is kept too (a tail), and every entry keeps its tokens: where a prompt's full
blocks stop matching, it reuses as many rows of the entry after them as its own tokens share with that entry
(the longest common prefix), so a question over a cached document prefills the question alone, not the rest of
the document's last block as well.

A block holds exactly what a slot holds for those positions (K and V as stored, an int8 cache's row scales, the
keys' codes), copied out of the slot once the prefill has written them. A request whose prompt begins with cached
blocks has them copied into its slot at memory speed and prefills only the rest, its key encoding included.
Blocks are copied, not shared in place: a slot's rows stay contiguous per head for the attention kernels, and
nothing a sequence holds can change or free a block, so a finished, failed or cancelled sequence leaves the
cache as it was.

Only prefilled positions are kept: rows a decode step wrote come from the decode weights (int8 by default), not
the prefill's, and a later prefill of the same tokens would not reproduce them. At least the prompt's last token
is always prefilled: its logits give the first new token.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from a2ats.runtime.slots import SlotCache

BLOCK = 256  # tokens per block


@dataclass(frozen=True)
class _Block:
    rows: list[list[torch.Tensor]]  # SlotCache.copy_out of the block's positions
    nbytes: int
    tokens: tuple[int, ...]  # its positions' tokens: a block's worth, or fewer for a tail
    parent: bytes  # the key of the full block before it (b"": none)


def _digest(prefix: bytes, tokens: list[int]) -> bytes:
    """A key: ``prefix`` (the key before, with a mark for a tail) and ``tokens``, hashed."""
    return hashlib.blake2b(prefix + torch.tensor(tokens, dtype=torch.int64).numpy().tobytes(), digest_size=16).digest()


def _common(a: tuple[int, ...], b: list[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class PrefixStats:
    lookups: int = 0  # prompts looked up
    hits: int = 0  # ... that found at least one block
    tokens_reused: int = 0  # prompt tokens copied from blocks instead of prefilled
    bytes_reused: int = 0  # ... the bytes copied for them
    evicted: int = 0  # blocks dropped for room


class PrefixCache:
    def __init__(self, capacity_bytes: int, block: int = BLOCK):
        """``capacity_bytes`` (>= 0, checked by the engine's settings) of blocks of ``block`` tokens."""
        self.capacity, self.block = capacity_bytes, block
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first, tails included
        self._children: dict[bytes, set[bytes]] = {}  # key of a full block (b"": none) -> the entries after it
        self.bytes = 0
        self.version = 0  # grows with every entry added: whether a catch-up could find anything new
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, prompt: list[int], end: int) -> list[bytes]:
        """The keys of the full blocks of ``prompt`` before position ``end``: each digests every token up to the
        block's end (a block is the same only after the same prefix)."""
        keys, h = [], b""
        for start in range(0, end - end % self.block, self.block):
            h = _digest(h, prompt[start : start + self.block])
            keys.append(h)
        return keys

    def load(self, prompt: list[int], cache: SlotCache, slot: int, have: int | None = None) -> int:
        """Copy the longest run of cached blocks that ``prompt`` begins with into ``slot`` (leaving its last token
        to prefill); the number of prompt tokens now in the slot. ``have``: positions the slot already holds (a
        sequence catching up with what another one prefilling the same prefix stored since): only the positions
        after them are copied, and the catch-up counts as no new lookup (as a hit where the lookup found none)."""
        lookup = have is None
        have = have or 0
        self.stats.lookups += lookup
        found = []
        for key in self._keys(prompt, len(prompt) - 1):
            b = self._blocks.get(key)
            if b is None:
                break
            found.append((key, b))
        pieces = [(i * self.block, b, self.block) for i, (_, b) in enumerate(found)]
        n = len(found) * self.block
        part, shared = self._best_child(found[-1][0] if found else b"", prompt[n : len(prompt) - 1])
        if shared:
            pieces.append((n, self._blocks[part], shared))
        self._touch([key for key, _ in found] + ([part] if shared else []))
        nbytes = 0
        for start, b, count in pieces:
            skip = min(max(have - start, 0), count)  # rows the slot holds already
            if skip < count:
                cache.copy_in(slot, start + skip, [[x[:, skip:count] for x in rows] for rows in b.rows])
                nbytes += b.nbytes * (count - skip) // len(b.tokens)
        n += shared
        if n > have:
            self.stats.hits += not have  # a prompt's first rows from the cache, at admission or in a catch-up
            self.stats.tokens_reused += n - have
            self.stats.bytes_reused += nbytes
        return max(n, have)

    def _best_child(self, parent: bytes, rest: list[int]) -> tuple[bytes, int]:
        """The entry after ``parent`` sharing the most tokens with ``rest``, and how many (0: none)."""
        best, shared = b"", 0
        for key in self._children.get(parent, ()):
            n = _common(self._blocks[key].tokens, rest)
            if n > shared:
                best, shared = key, n
        return best, shared

    def store(self, prompt: list[int], cache: SlotCache, slot: int, end: int) -> None:
        """Keep the full blocks of ``prompt`` before position ``end``, which ``slot`` holds as prefilled, as far
        as they fit with the chain's earlier blocks (other chains' least recently used blocks make room)."""
        keys = self._keys(prompt, end)
        self._touch(keys)  # first: room is made from other chains, never from this one's head
        chain = 0  # bytes of this chain's blocks held
        for i, key in enumerate(keys):
            b = self._blocks.get(key)
            if b is not None:
                chain += b.nbytes
                continue
            if not self._add(key, prompt, i * self.block, (i + 1) * self.block, keys[i - 1] if i else b"", cache, slot,
                             chain):
                self._touch(keys)
                return
            chain += self._blocks[key].nbytes
        start, parent = len(keys) * self.block, keys[-1] if keys else b""
        tail = prompt[start:end]
        if tail and self._best_child(parent, tail)[1] < len(tail):  # no entry after the same blocks holds it all
            key = _digest(parent + b"tail", tail)
            if self._add(key, prompt, start, end, parent, cache, slot, chain):
                keys = keys + [key]
        self._touch(keys)

    def _add(self, key: bytes, prompt: list[int], start: int, end: int, parent: bytes, cache: SlotCache, slot: int,
             chain: int) -> bool:
        """Hold positions [start, end) of ``slot`` as the entry ``key`` after ``parent`` if it fits with its chain's
        ``chain`` bytes, evicting the least recently used; False if it does not fit. Tails after ``parent`` that
        the new entry begins with go: it serves all they served."""
        tokens = tuple(prompt[start:end])
        rows = cache.copy_out(slot, start, end)
        nbytes = sum(x.numel() * x.element_size() for part in rows for x in part)
        if chain + nbytes > self.capacity:
            return False
        for old in [k for k in self._children.get(parent, ()) if tokens[: len(self._blocks[k].tokens)] ==
                    self._blocks[k].tokens]:
            self._remove(old)
        while self.bytes + nbytes > self.capacity:
            self._remove(next(iter(self._blocks)))
            self.stats.evicted += 1
        self._blocks[key] = _Block(rows, nbytes, tokens, parent)
        self._children.setdefault(parent, set()).add(key)
        self.bytes += nbytes
        self.version += 1
        return True

    def _remove(self, key: bytes) -> None:
        b = self._blocks.pop(key)
        self.bytes -= b.nbytes
        self._children[b.parent].discard(key)
        if not self._children[b.parent]:
            del self._children[b.parent]

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain used, its first block most recently: eviction takes chains from their ends."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def clear(self) -> None:
        self._blocks.clear()
        self._children.clear()
        self.bytes = 0
