"""Closed-loop HTTP load on the Serve endpoint, against a one-pipeline-call-per-request baseline.

    python -m benchmarks.serve_bench --out /tmp/serve-bench [--clients 16] [--duration 40] [--requests 2000]
                                     [--dtypes fp32,bf16] [--texts-per-request 1] [--size base]

Builds a random-weight BERT checkpoint (``--size base``: BERT-base shapes) under ``--out``, starts
a local Ray and Serve on 127.0.0.1, and for each precision runs, one at a time on the same cores
(and a whole GPU each, when the machine has one), with the same IMDB-length texts:

- **baseline**: a plain Serve deployment that calls ``transformers.pipeline("text-classification")``
  once per request, no batching, written the way Ray's own Serve examples write it;
- **ours**: `deployments.app.build_app` with its shipped defaults, one replica holding every CPU.

C clients each send a request, wait for the answer, and send the next, until the request count
or the duration runs out. Prints `benchmarks.run`'s table for its online part: texts/s, model
tokens/s, p50/p95/p99 latency per system, and each of ours against the baseline of the same
precision (``transformers.pipeline`` in bf16 measured slower than in fp32 on a CPU, so compare
with the fp32 baseline's row too); writes the rows to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks.harness import (
    cpu_supports_bf16,
    ensure_checkpoint,
    local_ray,
    serve_on_loopback,
    work_offline,
    write_json,
)
from benchmarks.run import online, render
from sentiment.testing import make_reviews, review_lengths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", required=True, help="directory for the checkpoint and results.json")
    add("--size", default="base", choices=["tiny", "base", "large"], help="checkpoint shape")
    add("--clients", type=int, default=16, help="concurrent closed-loop clients")
    add("--requests", type=int, default=2000, help="most requests per system")
    add("--duration", type=float, default=40, help="most seconds of load per system")
    add("--texts-per-request", type=int, default=1, help="texts in each request")
    add("--corpus", type=int, default=512, help="distinct review texts to cycle through")
    add("--dtypes", default="fp32,bf16", help="precisions to compare; no bf16 on a CPU without bf16 support")
    options = parser.parse_args(argv)
    work_offline()
    out = Path(options.out)
    checkpoint = ensure_checkpoint(out, options.size)
    texts, options.lengths = make_reviews(options.corpus, seed=7), review_lengths(options.corpus, seed=7).tolist()
    options.levels, options.replicas = [options.clients], 1
    with local_ray(num_cpus=os.cpu_count()) as ray, serve_on_loopback() as port:
        # With a GPU, each system gets one whole GPU.
        options.device = "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
        dtypes = [d for d in options.dtypes.split(",") if d]
        if "bf16" in dtypes and options.device == "cpu" and not cpu_supports_bf16():
            print("this CPU has no bf16 instructions (avx512_bf16/amx_bf16): skipping bf16", file=sys.stderr)
            dtypes.remove("bf16")
        per = options.texts_per_request
        rows = online(port, checkpoint, texts, dtypes, dtypes, options, per, options.requests)
    write_json(out / "results.json", [asdict(row) for row in rows])
    print(f"\n{options.size} checkpoint, {per} text(s) per request, {os.cpu_count()} CPUs, {options.device}\n")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
