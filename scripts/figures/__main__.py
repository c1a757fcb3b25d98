"""The figures in README.md and docs/, generated from committed result files.

A generated block in a Markdown file is

    <!-- figures:NAME -->
    ...
    <!-- /figures:NAME -->

or, inside a sentence, ``<!-- figures:NAME -->...<!-- /figures:NAME -->`` on one line (one line of text); NAME is
a function registered by a ``*_blocks.py`` module here (``blocks.BLOCKS``) that reads committed result files, checks
that their recorded settings are the ones the block claims (model, variant, budget, lengths, machine; a clear error
otherwise) and renders Markdown that names the source file's machine, date, commit and command.

    python scripts/figures           # rewrite every generated block (make figures)
    python scripts/figures --check   # exit 1 naming each stale block, each block that cannot be rendered,
                                     # and each measured figure outside a block (the lint)

Python runs this folder's ``__main__.py`` with the folder on ``sys.path``: its modules import each other by name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# the generators register their blocks on import
import commands_blocks  # noqa: F401
import floor_blocks  # noqa: F401
import qwen_blocks  # noqa: F401
import readme_blocks  # noqa: F401
import smollm2_blocks  # noqa: F401
import speed_blocks  # noqa: F401
import target_blocks  # noqa: F401
import throughput_blocks  # noqa: F401
from blocks import process
from lint import measured_figures
from markers import BLOCK, doc_files

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale block and figure")
    p.add_argument("--root", type=Path, default=ROOT, help="the repository root (default: this checkout)")
    a = p.parse_args(argv)
    root = a.root.resolve()
    problems = process(root, write=not a.check)
    if a.check:
        problems += [f"measured figure outside a generated block: {f}" for f in measured_figures(root)]
    elif not problems:
        print(f"figures: {sum(len(BLOCK.findall(f.read_text())) for f in doc_files(root))} blocks up to date")
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
