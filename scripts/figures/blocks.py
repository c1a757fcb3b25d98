"""The generated blocks: the registry of their generators (``@block``), the error a generator raises when its source
does not say what the block claims, and rendering the blocks into the Markdown files (``process``)."""

from __future__ import annotations

from pathlib import Path

from markers import BLOCK, OPEN, doc_files


class FigureError(Exception):
    """A block's source does not say what the block claims, or cannot be read."""


BLOCKS: dict = {}


def block(name: str):
    def register(fn):
        BLOCKS[name] = fn
        return fn
    return register


def expect(ok: bool, msg: str) -> None:
    if not ok:
        raise FigureError(msg)


def render(root: Path, name: str) -> str:
    fn = BLOCKS.get(name)
    if fn is None:
        raise FigureError(f"no generator for block {name!r} (known: {', '.join(sorted(BLOCKS))})")
    return fn(root).strip("\n")


def fill(text: str, inline: bool) -> str:
    """A rendered block as it sits between its markers: on lines of its own, or inline in a sentence."""
    if inline:
        expect("\n" not in text, "an inline block must render one line")
        return text
    return "\n" + text + "\n"


def process(root: Path, files: list[Path] | None = None, write: bool = False) -> list[str]:
    """Re-render every generated block; with ``write``, rewrite the files. Returns one problem per stale or
    unrenderable block."""
    problems, cache = [], {}
    for path in files if files is not None else doc_files(root):
        text = path.read_text()
        rel = path.relative_to(root).as_posix()
        opened = [m.group(2) for m in OPEN.finditer(text) if not m.group(1)]
        matched = [m.group("name") for m in BLOCK.finditer(text)]
        if sorted(opened) != sorted(matched):
            problems.append(f"{rel}: unbalanced generated block markers ({', '.join(sorted(set(opened) - set(matched)))})")

        def sub(m):
            name, inline = m.group("name"), not m.group("body").startswith("\n")
            try:
                if name not in cache:
                    cache[name] = render(root, name)
                body = fill(cache[name], inline)
            except (FigureError, KeyError, ValueError, OSError) as e:
                problems.append(f"{rel}: block {name}: {type(e).__name__}: {e}")
                return m.group(0)
            if body != m.group("body") and not write:
                problems.append(f"{rel}: block {name} is stale (run `make figures`)")
            return m.group(1) + body + m.group(4)

        new = BLOCK.sub(sub, text)
        if write and new != text:
            path.write_text(new)
    return problems
