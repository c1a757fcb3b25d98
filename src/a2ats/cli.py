"""Command line: ``a2ats demo | generate | serve | calibrate | eval | report | bench`` (``python -m a2ats`` is the same).

It only parses and dispatches: each command's options and run live with what it runs (``add_*arguments`` and a
``main``-like function in :mod:`a2ats.factory.commands`, :mod:`a2ats.server.cli`, :mod:`a2ats.eval.cli` and
:mod:`a2ats.bench.cli`), the options they share in :mod:`a2ats.factory.options`.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

from a2ats.bench import cli as bench
from a2ats.eval import cli as evaluation
from a2ats.factory import commands, options
from a2ats.server import cli as server

TORCHRUN_COMMANDS = ("generate", "demo")  # commands that run sharded over torchrun's ranks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="a2ats", description="A²ATS retrieval attention for Hugging Face causal LMs")
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(name: str, add_arguments, fn, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        add_arguments(c)
        c.set_defaults(fn=fn)
        return c

    command("generate", commands.add_generate_arguments, commands.generate,
            "answer a prompt (file or stdin), streaming tokens, with A²ATS decoding")
    command("serve", server.add_arguments, server.main,
            "answer many prompts with continuous batching, K/V in host memory (JSON lines out), or serve HTTP")
    command("demo", commands.add_demo_arguments, commands.demo,
            "a needle-in-a-haystack question over essays, answered with A²ATS")
    command("calibrate", commands.add_calibrate_arguments, commands.calibrate,
            "build query-aware codebooks for a model from the built-in offline corpus")
    command("eval", evaluation.add_eval_arguments, evaluation.run_eval,
            "accuracy suite: RULER-style tasks, every method at equal budgets, shared prefill")
    command("report", evaluation.add_report_arguments, evaluation.run_report,
            "tables and plots from one or more eval results.jsonl files (e.g. runs of other methods on the same prompts)")
    b = sub.add_parser("bench", help="speed: `bench kernels` (the CPU kernels vs read bandwidth), `bench decode` (ms/token "
                       "vs context), `bench prefill`, `bench throughput` (tokens/s vs batch, serving engine), `bench "
                       "weights` (perplexity per decode weight format), `bench project` (performance model), `bench "
                       "serve` (the HTTP server under load)")
    bench.add_arguments(b, http_server=server.http_server)
    return p


@contextmanager
def _ranks(a):
    """Under torchrun: only the commands that run sharded, a prompt from a file (stdin reaches one rank only),
    rank 0 alone printing; the process group is left at the end. Otherwise nothing."""
    from a2ats.hf import tp

    if not tp.launched():
        yield
        return
    from a2ats.core.distributed import TensorParallelError

    options.quiet = int(os.environ.get("RANK", "0")) != 0
    if a.cmd not in TORCHRUN_COMMANDS:
        raise TensorParallelError(f"`a2ats {a.cmd}` runs in one process; under torchrun a2ats runs "
                                  f"{' and '.join(TORCHRUN_COMMANDS)}: drop torchrun")
    if a.cmd == "generate" and not a.prompt_file:
        raise TensorParallelError("under torchrun give the prompt with --prompt-file (stdin reaches one rank only)")
    # the file descriptor, not sys.stdout: writers that hold the stream from import time go quiet too
    saved = os.dup(1) if options.quiet else None
    if options.quiet:
        sys.stdout.flush()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    try:
        yield
    finally:
        if saved is not None:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        tp.finish()


def main(argv: list[str] | None = None) -> int:
    from a2ats.assets.models import AssetError
    from a2ats.core.codebook import CodebookError
    from a2ats.core.distributed import TensorParallelError
    from a2ats.runtime import ServeError

    a = build_parser().parse_args(argv)
    try:
        options.check(a)  # the shared options, before any model loads; each command checks its own
        with _ranks(a):
            return a.fn(a)
    except TensorParallelError as e:  # every rank refuses alike: said once
        if not options.quiet:
            print(f"a2ats {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except (AssetError, CodebookError, ValueError, OSError) as e:
        who = f" (rank {os.environ.get('RANK')})" if options.quiet else ""  # a rank's own trouble is not hidden
        print(f"a2ats {a.cmd}{who}: error: {e}", file=sys.stderr)
        return 2
    except ServeError as e:  # the completions finished before it are already written
        print(f"a2ats {a.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
