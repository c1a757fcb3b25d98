"""The lint: measured figures in the prose outside generated blocks, and the constants the prose may state."""

from __future__ import annotations

import re
from pathlib import Path

from markers import BLOCK, doc_files

# A number followed by a unit of something measured: time, speed-up, share, rate, size.
MEASURED = re.compile(
    r"(?<![\w.])[~≈±]?\d[\d,]*(?:\.\d+)?\s?(?:ms|s|min|h|%|GB/s|MB/s|TB/s|GFLOP/s|tokens/s|KiB|MiB|GiB|KB|MB|GB|TB)"
    r"(?![\w/])|(?<![\w.])\d[\d,]*(?:\.\d+)?[x×](?!\w)")
# Non-measured constants the prose may state: each pattern matches the figure with its context, and says why.
ALLOWED = [
    (re.compile(r"ρ\s*=\s*\d+(?:\.\d+)?%(?:(?:,\s*|\s+and\s+|\s+or\s+)\d+(?:\.\d+)?%)*"),
     "a budget setting (ρ, or a list of them): configuration, not a measurement"),
    (re.compile(r"(?<![\d.])(?:1\.5|3|6|10)% (?:per (?:KV|query) head|of the context)"),
     "the library's budget settings, per head or of the context"),
    (re.compile(r"(?:\bat |top-)(?:1\.5|3|6|10)%"), "a budget setting named as one (the union at 3%, top-3%)"),
    (re.compile(r"\b95% (?:bootstrap )?intervals?"), "the confidence level of an interval"),
    (re.compile(r"\bwithin 1% of the model's"), "the decode-weight default's acceptance threshold"),
    (re.compile(r"491,400,064 bytes"), "the published size of the Qwen GGUF, checked on load"),
]


def _tool_output(path: Path) -> bool:
    """A Markdown file a tool wrote beside its data (NAME.md by NAME.json, summary.md by results.jsonl): a result
    file itself, not prose about one."""
    return path.with_suffix(".json").is_file() or (path.name == "summary.md" and (path.parent / "results.jsonl").is_file())


def _blank(m: re.Match) -> str:
    return "\n" * m.group().count("\n")  # keep line numbers


FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```[^\n]*$", re.S | re.M)


def measured_figures(root: Path, files: list[Path] | None = None) -> list[str]:
    """``path:line: figure`` for each measured figure outside code fences and generated blocks (docs/design.md and
    the tools' own Markdown output excepted) that no ``ALLOWED`` pattern covers."""
    found = []
    for path in files if files is not None else doc_files(root):
        rel = path.relative_to(root).as_posix()
        if rel == "docs/design.md" or _tool_output(path):
            continue
        text = BLOCK.sub(_blank, FENCE.sub(_blank, path.read_text()))
        for i, line in enumerate(text.splitlines(), 1):
            allowed = [a.span() for pat, _ in ALLOWED for a in pat.finditer(line)]
            for f in MEASURED.finditer(line):
                if not any(s <= f.start() and f.end() <= e for s, e in allowed):
                    found.append(f"{rel}:{i}: {f.group().strip()}  ({line.strip()[:100]})")
    return found
