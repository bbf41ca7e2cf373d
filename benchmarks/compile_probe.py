"""Does ``torch.compile`` speed up the classifier's model on this machine? Eager against compiled.

    python -m benchmarks.compile_probe [--dtypes fp32,bf16] [--size base] [--out benchmarks/out/run]

Loads the random-weight checkpoint (`benchmarks.common.ensure_checkpoint`), runs a few batch shapes
(batch x length, like the token-budget batches of IMDB-length reviews) eagerly, then compiles the
model with inductor (``dynamic=True``: the budget batches have many shapes) and runs the same inputs
again. Prints tokens/s per shape for both, the compile time and the largest logit difference.
An experiment, not a product feature: see benchmarks/RESULTS.md for what was concluded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import ensure_checkpoint

SHAPES = ((1, 289), (1, 217), (4, 256), (2, 500))
REPEATS = 3


def tokens_per_s(model: Any, inputs: dict[tuple[int, int], Any]) -> tuple[dict[str, int], dict[tuple[int, int], Any]]:
    import torch

    speeds: dict[str, int] = {}
    logits: dict[tuple[int, int], Any] = {}
    with torch.inference_mode():
        for (batch, length), ids in inputs.items():
            mask = torch.ones_like(ids)
            model(input_ids=ids, attention_mask=mask)  # first call: kernels chosen, graphs compiled
            started = time.perf_counter()
            for _ in range(REPEATS):
                logits[(batch, length)] = model(input_ids=ids, attention_mask=mask).logits.float()
            speeds[f"{batch}x{length}"] = round(batch * length * REPEATS / (time.perf_counter() - started))
    return speeds, logits


def probe(checkpoint: Path, dtype: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch_dtype).eval()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    inputs = {shape: torch.randint(5, vocab, shape, generator=generator) for shape in SHAPES}
    eager, eager_logits = tokens_per_s(model, inputs)
    started = time.perf_counter()
    compiled_model = torch.compile(model, dynamic=True)
    with torch.inference_mode():
        compiled_model(input_ids=inputs[SHAPES[0]], attention_mask=torch.ones_like(inputs[SHAPES[0]]))
    compile_seconds = time.perf_counter() - started
    compiled, compiled_logits = tokens_per_s(compiled_model, inputs)
    difference = max(float((eager_logits[s] - compiled_logits[s]).abs().max()) for s in SHAPES)
    return {
        "dtype": dtype,
        "eager_tokens_per_s": eager,
        "compiled_tokens_per_s": compiled,
        "speedup": {key: round(compiled[key] / eager[key], 2) for key in eager},
        "first_compile_s": round(compile_seconds, 1),
        "max_abs_logit_difference": difference,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp32,bf16", help="precisions to probe (default %(default)s)")
    parser.add_argument("--size", default="base", choices=["tiny", "base", "large"], help="checkpoint shape")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/out/run", help="where the checkpoint lives (default %(default)s)")
    options = parser.parse_args(argv)

    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    checkpoint = ensure_checkpoint(Path(options.out).resolve(), options.size)
    for dtype in [d for d in options.dtypes.split(",") if d]:
        print(json.dumps(probe(checkpoint, dtype)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
