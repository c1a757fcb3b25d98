"""`a2ats bench kernels | decode | prefill | throughput | weights | project | serve`: a subcommand each, with only
the options it uses; each module's ``add_arguments`` and ``main`` hold them and the run."""

from __future__ import annotations

import functools

from a2ats.bench import decode, kernels, prefill, serve, throughput, weights
from a2ats.bench.project import cli as project

SUBCOMMANDS = {
    "kernels": (kernels, "the CPU kernels against the host's read bandwidth"),
    "decode": (decode, "ms per token against context, per variant (fast path, reference, dense, llama.cpp)"),
    "prefill": (prefill, "prefill tokens/s per length, with and without key encoding (and llama.cpp's)"),
    "throughput": (throughput, "decode tokens/s against batch and context, the serving engine"),
    "weights": (weights, "perplexity per decode weight format"),
    "project": (project, "the performance model of the paper's serving system (projections, not measurements)"),
    "serve": (serve, "the HTTP server under concurrent streaming clients, then a soak run"),
}


def add_arguments(b, http_server) -> None:
    """The subcommands on the ``bench`` parser ``b``; ``http_server``: what `bench serve` loads (bench does not
    import the server: the command line hands in :func:`a2ats.server.cli.http_server`)."""
    sub = b.add_subparsers(dest="what", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, about) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=about, description=about)
        module.add_arguments(p)
        p.set_defaults(fn=functools.partial(module.main, http_server=http_server) if module is serve else module.main)
