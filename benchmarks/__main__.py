"""``python -m benchmarks MODE [options]``: every benchmark behind one command.

Each mode is a module of this package with its own options (``python -m benchmarks MODE --help``),
a short function over one harness (`benchmarks.harness`: machine facts, checkpoints and corpora,
processes, Serve apps, closed-loop load, tables). Their figures go into ``benchmarks/RESULTS.md``
by hand or (``run``) by themselves.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

MODES = {
    "run": ("benchmarks.run", "model-only ceiling, offline and online side by side, one table"),
    "offline": ("benchmarks.offline_bench", "sentiment batch as a process: pipeline overhead, the user's comparison"),
    "online": ("benchmarks.serve_bench", "the endpoint against a per-request transformers.pipeline deployment"),
    "overload": ("benchmarks.overload_bench", "4x the saturating concurrency, with and without shedding"),
    "gpu-check": ("benchmarks.gpu_check", "the GPU verification script (precision, MFU, replicas, batch, OOM)"),
    "engines": ("benchmarks.engines", "ONNX Runtime fp32/int8 against torch: fidelity on a trained BERT, speed, jobs"),
    "host-overhead": ("benchmarks.host_overhead", "the batch actor's host work per call, no model: old path vs new"),
    "corpus": ("benchmarks.corpus", "write the synthetic IMDB-length corpus as Parquet"),
}


def usage() -> str:
    width = max(map(len, MODES))
    lines = [f"  {mode:<{width}}  {text}" for mode, (_, text) in MODES.items()]
    return "usage: python -m benchmarks MODE [options]   (MODE --help for its options)\n\nmodes:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    mode, rest = args[0], args[1:]
    if mode not in MODES:
        print(f"python -m benchmarks: unknown mode {mode!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(MODES[mode][0])
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
