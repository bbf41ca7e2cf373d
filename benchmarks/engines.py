"""ONNX Runtime (fp32, int8) against torch fp32 on the CPU: fidelity on a trained model, speed, whole jobs.

    python -m benchmarks engines fidelity [--train 3000] [--test 2000] [--epochs 3] [--int8-variants]
    python -m benchmarks engines speed    [--reviews 48] [--rounds 3]
    python -m benchmarks engines batch    [--rows 200] [--repeats 1]
    python -m benchmarks engines serve    [--clients 16] [--duration 30] [--repeats 1]

- **fidelity**: trains a small BERT (4 layers, hidden 128) from scratch on reviews whose label
  follows from the text (`sentiment.testing.labelled_reviews`: more positive or more negative
  words) to at least 95% held-out accuracy, exports it (`sentiment.export`) in fp32 and int8, and
  reports for each engine against torch fp32 on the held-out reviews: max |Δp| (probability of
  the positive class), label agreement and accuracy. Random weights could not show this: their
  classes sit a rounding apart. ``--int8-variants`` adds int8 exports with other quantizer settings.
- **speed**: model only, `SentimentClassifier.forward` over the windows of reviews with IMDB
  lengths (`benchmarks.corpus`), random-weight BERT-base, each engine in turn, ``--rounds`` times in
  rotating order (A B C, B C A, ...): tokens/s and the ratio to torch fp32 of the same round.
- **batch**: ``sentiment batch --dtype int8`` (and fp32) as whole processes, Python start, Ray start
  and model load included, against a process running the ``transformers.pipeline`` a user would
  write (fp32, batch_size 16); the int8 export is made into the cache beforehand (once per machine).
- **serve**: ``sentiment serve --dtype int8`` against ``--dtype fp32``, one replica on every core,
  closed-loop clients sending one review per request.

Every mode prints the CPU model and its vector extensions: AVX-512 VNNI or AMX machines run int8
several times faster than AVX2-only ones. Random or trained checkpoints are built here, no network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import closed_loop, cpu_name, ensure_checkpoint, free_port
from sentiment.testing import make_reviews, popen_interruptible, write_corpus

REPO = Path(__file__).resolve().parents[1]
# The small BERT the fidelity mode trains: big enough to learn the task in a few CPU minutes.
TRAINED_SIZE: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
}
# The quantizer's other settings, for --int8-variants: one scale per tensor or per output channel, and
# weights in 7 bits (reduce_range: ORT's advice for AVX2 and AVX-512 without VNNI, whose u8 x s8 products
# saturate in 16 bits) or 8.
INT8_VARIANTS = [
    {"per_channel": per_channel, "reduce_range": reduce_range}
    for per_channel in (True, False)
    for reduce_range in (True, False)
]
_PIPELINE_SCRIPT = """
import sys, torch, pyarrow.parquet as pq
from transformers import pipeline
texts = pq.read_table(sys.argv[1]).column("text").to_pylist()
classify = pipeline("text-classification", model=sys.argv[2], dtype=torch.float32, device="cpu")
print(len(classify(texts, batch_size=16, truncation=True)))
"""


def cpu_flags() -> str:
    """The CPU's vector extensions that decide int8 and bf16 speed (avx2, avx512*, vnni, amx)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    wanted = sorted(flag for flag in flags if flag.startswith(("avx", "amx")) or "vnni" in flag)
    return " ".join(wanted) or "none"


def machine() -> str:
    """The CPU, its flags and the 1-minute load average now (this machine may be shared: other work shows there)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_name()}, {os.cpu_count()} CPUs, flags: {cpu_flags()}; load average {load:.1f} at the end"


# -- fidelity ---------------------------------------------------------------------------------------


def train_small_bert(path: Path, train: int, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Train a small BERT on `labelled_reviews` and save it as a checkpoint at ``path``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from sentiment.config import ModelConfig
    from sentiment.encoding import TextEncoder
    from sentiment.packing import Padder, TokenWindows, WindowBatch
    from sentiment.testing import labelled_reviews, make_checkpoint, vocab

    # The tokenizer (and a placeholder model, replaced below) of the test vocab.
    make_checkpoint(path, size="tiny", id2label={0: "neg", 1: "pos"})
    encoder = TextEncoder(ModelConfig(model_id=str(path)))
    texts, labels = labelled_reviews(train, seed=seed)
    windows = TokenWindows.from_lists([text.windows[0] for text in encoder.encode(texts)])
    padder = Padder(encoder.pad_id)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab()),
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
        **TRAINED_SIZE,
    )
    model = BertForSequenceClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    batch_size = 32
    steps = epochs * ((len(windows) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-4, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(windows))
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, mask = padder.pad(WindowBatch(windows, batch))
            loss = model(
                input_ids=torch.from_numpy(ids),
                attention_mask=None if mask is None else torch.from_numpy(mask),
                labels=torch.tensor([labels[i] for i in batch]),
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(order):.4f}", flush=True)
    model.eval().save_pretrained(path)
    return {"train_reviews": train, "epochs": epochs, "train_seconds": time.perf_counter() - started}


def fidelity(out: Path, train: int, test: int, epochs: int, variants: bool) -> dict[str, Any]:
    from sentiment.config import ModelConfig
    from sentiment.export import QUANTIZATION, export_checkpoint
    from sentiment.model import SentimentClassifier
    from sentiment.testing import labelled_reviews

    checkpoint = out / "trained-small-bert"
    print(f"Training a small BERT ({TRAINED_SIZE}) on {train} labelled reviews...", flush=True)
    training = train_small_bert(checkpoint, train, epochs)
    texts, labels = labelled_reviews(test, seed=10_000)

    contenders: dict[str, dict[str, Any] | None] = {"torch fp32": None, "onnxruntime fp32": None}
    contenders[f"onnxruntime int8 ({_settings(QUANTIZATION)}, shipped)"] = {}
    if variants:
        for settings in INT8_VARIANTS:
            if any(settings[key] != QUANTIZATION[key] for key in settings):
                contenders[f"onnxruntime int8 ({_settings(settings)})"] = settings
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    for index, (name, quantization) in enumerate(contenders.items()):
        model_dir = checkpoint
        if name != "torch fp32":
            model_dir = out / f"trained-onnx-{index}"
            dtype = "fp32" if quantization is None else "int8"
            export_checkpoint(
                ModelConfig(model_id=str(checkpoint)), model_dir, dtype, overwrite=True, quantization=quantization
            )
        classifier = SentimentClassifier(ModelConfig(model_id=str(model_dir), device="cpu"))
        positive = np.array([p.scores["pos"] for p in classifier.predict(texts)])
        predicted = (positive > 0.5).astype(int)
        if reference is None:
            reference = positive
        reference_labels = (reference > 0.5).astype(int)
        rows.append(
            {
                "engine": name,
                "backend": classifier.backend,
                "dtype": classifier.dtype,
                "max_abs_dp": float(np.abs(positive - reference).max()),
                "mean_abs_dp": float(np.abs(positive - reference).mean()),
                "label_agreement": float((predicted == reference_labels).mean()),
                "accuracy": float((predicted == np.array(labels)).mean()),
            }
        )
    accuracy = rows[0]["accuracy"]
    print(f"\nsmall BERT trained in {training['train_seconds']:.0f} s to {accuracy:.2%} held-out accuracy")
    print(f"{test} held-out reviews; {machine()}")
    print("| engine | max abs Δp vs torch fp32 | mean abs Δp | label agreement | accuracy | accuracy drop (points) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        drop = 100 * (rows[0]["accuracy"] - row["accuracy"])
        print(
            f"| {row['engine']} | {row['max_abs_dp']:.2g} | {row['mean_abs_dp']:.2g} | {row['label_agreement']:.2%} | "
            f"{row['accuracy']:.2%} | {drop:.2f} |"
        )
    return {"training": training, "test_reviews": test, "rows": rows}


def _settings(quantization: dict[str, Any]) -> str:
    channel = "per-channel" if quantization.get("per_channel") else "per-tensor"
    return channel + (", reduce_range" if quantization.get("reduce_range") else "")


# -- speed ------------------------------------------------------------------------------------------


def speed(out: Path, reviews: int, rounds: int) -> dict[str, Any]:
    from sentiment.config import ModelConfig
    from sentiment.export import QUANTIZATION, content_sha256, export_checkpoint
    from sentiment.exported import read_manifest
    from sentiment.loading import checkpoint_files
    from sentiment.model import SentimentClassifier

    checkpoint = ensure_checkpoint(out, "base")
    sha = content_sha256(checkpoint_files(checkpoint))
    dirs = {}
    for dtype in ("fp32", "int8"):
        target = out / f"checkpoint-base-onnx-{dtype}"
        # Reused only if made from this checkpoint with today's quantizer settings.
        quantization = None if dtype == "fp32" else {"method": "quantize_dynamic", **QUANTIZATION}
        manifest = read_manifest(target) if (target / "manifest.json").is_file() else None
        if manifest is None or (manifest.source_sha256, manifest.quantization) != (sha, quantization):
            print(f"Exporting BERT-base to ONNX ({dtype})...", flush=True)
            started = time.perf_counter()
            export_checkpoint(ModelConfig(model_id=str(checkpoint)), target, dtype, overwrite=True)
            print(f"  {time.perf_counter() - started:.0f} s", flush=True)
        dirs[dtype] = target
    engines = {
        "torch fp32": SentimentClassifier(ModelConfig(model_id=str(checkpoint), device="cpu", dtype="fp32")),
        "onnxruntime fp32": SentimentClassifier(ModelConfig(model_id=str(dirs["fp32"]))),
        "onnxruntime int8": SentimentClassifier(ModelConfig(model_id=str(dirs["int8"]))),
    }
    reference = engines["torch fp32"]
    windows = [window for text in reference.encode(make_reviews(reviews, seed=5)) for window in text.windows]
    tokens = sum(len(window) for window in windows)
    for classifier in engines.values():
        classifier.warmup()
    names = list(engines)
    speeds: dict[str, list[float]] = {name: [] for name in names}
    loads: list[float] = []
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            started = time.perf_counter()
            engines[name].forward(windows)
            speeds[name].append(tokens / (time.perf_counter() - started))
        loads.append(os.getloadavg()[0])
        print(f"  round {round_index + 1}: " + ", ".join(f"{n} {speeds[n][-1]:.0f}" for n in names), flush=True)
    ratios = {name: [s / t for s, t in zip(speeds[name], speeds["torch fp32"], strict=True)] for name in names}
    threads = {name: classifier.describe()["threads"] for name, classifier in engines.items()}
    budgets = {name: classifier.forward_max_tokens for name, classifier in engines.items()}
    print(
        f"\nBERT-base (random weights), {len(windows)} windows of {reviews} reviews with IMDB lengths, "
        f"{tokens} tokens; {machine()}"
    )
    print("| engine | threads | forward budget | tokens/s (median) | vs torch fp32 (median of rounds) | rounds |")
    print("|---|---:|---:|---:|---:|---|")
    for name in names:
        print(
            f"| {name} | {threads[name]} | {budgets[name]} | {statistics.median(speeds[name]):.0f} | "
            f"{statistics.median(ratios[name]):.2f}x | {', '.join(f'{r:.2f}' for r in ratios[name])} |"
        )
    print(f"load average after each round: {', '.join(f'{load:.1f}' for load in loads)}")
    return {"tokens": tokens, "windows": len(windows), "speeds": speeds, "ratios": ratios, "loads": loads}


# -- whole jobs -------------------------------------------------------------------------------------


def environment(out: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Exports made on demand go to this run's directory, not to ~/.cache.
    env["SENTIMENT_ONNX_CACHE"] = str(out / "onnx-cache")
    env.pop("RAY_ADDRESS", None)
    return env


class LoadSampler:
    """The 1-minute load average every few seconds while a run lasts: on a shared machine, other work shows."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self.samples.append(os.getloadavg()[0])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return statistics.mean(self.samples)


def timed(argv: list[str], out: Path, log: Path) -> tuple[float, float]:
    """Seconds a command took as a whole process, and the mean load average meanwhile."""
    started = time.perf_counter()
    with log.open("w") as sink, LoadSampler() as load:
        subprocess.run(argv, cwd=REPO, env=environment(out), stdout=sink, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started, load.mean


def warm_cache(out: Path, checkpoint: Path) -> float:
    """Export the int8 model into this run's cache (as the first int8 job would), outside the timings."""
    started = time.perf_counter()
    code = (
        "from sentiment.config import ModelConfig; from sentiment.engines import prepare_onnx; "
        f"print(prepare_onnx(ModelConfig(model_id={str(checkpoint)!r}, dtype='int8')))"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment(out), check=True, capture_output=True)
    return time.perf_counter() - started


def batch(out: Path, rows: int, repeats: int) -> dict[str, Any]:
    checkpoint = ensure_checkpoint(out, "base")
    corpus = out / f"corpus-{rows}"
    if not corpus.exists():
        write_corpus(corpus, rows=rows, files=1, seed=0)
    export_seconds = warm_cache(out, checkpoint)
    commands = {
        "transformers.pipeline, fp32, batch_size 16": [
            sys.executable,
            "-c",
            _PIPELINE_SCRIPT,
            str(corpus),
            str(checkpoint),
        ],
    }
    for dtype in ("fp32", "int8"):
        commands[f"sentiment batch --dtype {dtype}"] = [
            sys.executable, "-m", "ray_sentiment", "batch", str(corpus), str(out / f"scored-{dtype}"),
            "--model", str(checkpoint), "--dtype", dtype, "--overwrite",
        ]  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    loads: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            log = out / f"batch-{names.index(name)}-{repeat}.log"
            took, load = timed(commands[name], out, log)
            seconds[name].append(took)
            loads[name].append(load)
            print(f"  {name}: {took:.1f} s, mean load {load:.1f}", flush=True)
            time.sleep(3)  # a job's local Ray winds down
    baseline = names[0]
    reports = {dtype: json.loads((out / f"scored-{dtype}" / "_report.json").read_text()) for dtype in ("fp32", "int8")}
    print(f"\n{rows} reviews with IMDB lengths, BERT-base (random weights); {machine()}")
    print(f"int8 export into the cache beforehand (once per machine, not timed): {export_seconds:.0f} s")
    print("| run (whole process) | seconds (each) | mean load (each) | rows/s | vs transformers.pipeline |")
    print("|---|---|---|---:|---:|")
    for name in names:
        mean = statistics.mean(seconds[name])
        ratio = statistics.mean(seconds[baseline]) / mean
        each = ", ".join(f"{s:.1f}" for s in seconds[name])
        each_load = ", ".join(f"{load:.1f}" for load in loads[name])
        print(f"| {name} | {each} | {each_load} | {rows / mean:.2f} | {ratio:.2f}x |")
    actors = {dtype: [(a["backend"], a["dtype"], a["threads"]) for a in r["actors"]] for dtype, r in reports.items()}
    print(f"actors (backend, dtype, threads): {actors}")
    return {"rows": rows, "seconds": seconds, "loads": loads, "export_seconds": export_seconds, "actors": actors}


def serve(out: Path, clients: int, duration: float, repeats: int) -> dict[str, Any]:
    checkpoint = ensure_checkpoint(out, "base")
    warm_cache(out, checkpoint)
    texts = make_reviews(200, seed=9)
    payloads = [{"texts": [text]} for text in texts]
    results: dict[str, list[dict[str, float]]] = {"fp32": [], "int8": []}
    for repeat in range(repeats):
        for dtype in ("fp32", "int8") if repeat % 2 == 0 else ("int8", "fp32"):
            port = free_port()
            argv = [
                sys.executable, "-m", "ray_sentiment", "serve", "--model", str(checkpoint), "--dtype", dtype,
                "--port", str(port), "--num-replicas", "1",
            ]  # fmt: skip
            log = (out / f"serve-{dtype}-{repeat}.log").open("w")
            server = popen_interruptible(argv, cwd=REPO, env=environment(out), stdout=log, stderr=subprocess.STDOUT)
            try:
                info = _wait_ready(f"http://127.0.0.1:{port}", server, timeout_s=600)
                url = f"http://127.0.0.1:{port}/v1/classify"
                with LoadSampler() as machine_load:
                    load = asyncio.run(
                        closed_loop(url, payloads, clients, duration, max_requests=100_000, warmup=clients)
                    )
            finally:
                server.send_signal(2)
                try:
                    server.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    server.kill()
                log.close()
            summary = load.summary()
            results[dtype].append(
                {
                    "texts_per_s": summary["texts_per_s"],
                    "p50_ms": summary["p50_ms"],
                    "p95_ms": summary["p95_ms"],
                    "errors": load.errors,
                    "threads": info["threads"],
                    "backend": info["backend"],
                    "load": machine_load.mean,
                }
            )
            print(f"  {dtype}: {results[dtype][-1]}", flush=True)
            time.sleep(3)
    print(f"\nsentiment serve, 1 replica, {clients} closed-loop clients, 1 review per request, {duration:.0f} s each; "
          f"{machine()}")  # fmt: skip
    print("| replica | backend | threads | texts/s (each run) | mean load (each) | p50 ms | p95 ms | vs fp32 |")
    print("|---|---|---:|---|---|---:|---:|---:|")
    fp32 = statistics.mean(run["texts_per_s"] for run in results["fp32"])
    for dtype, runs in results.items():
        mean = statistics.mean(run["texts_per_s"] for run in runs)
        each = ", ".join(f"{run['texts_per_s']:.2f}" for run in runs)
        each_load = ", ".join(f"{run['load']:.1f}" for run in runs)
        print(
            f"| --dtype {dtype} | {runs[0]['backend']} | {runs[0]['threads']} | {each} | {each_load} | "
            f"{statistics.median(run['p50_ms'] for run in runs):.0f} | "
            f"{statistics.median(run['p95_ms'] for run in runs):.0f} | {mean / fp32:.2f}x |"
        )
    return {"clients": clients, "duration_s": duration, "results": results}


def _wait_ready(base: str, server: subprocess.Popen[Any], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"sentiment serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/info", timeout=5) as response:
                return dict(json.loads(response.read()))
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"sentiment serve was not ready after {timeout_s:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks engines", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["fidelity", "speed", "batch", "serve"])
    parser.add_argument("--out", default="benchmarks/out/engines", help="working directory (default: %(default)s)")
    parser.add_argument("--train", type=int, default=3000, help="fidelity: training reviews")
    parser.add_argument("--test", type=int, default=2000, help="fidelity: held-out reviews")
    parser.add_argument("--epochs", type=int, default=3, help="fidelity: training epochs")
    parser.add_argument("--int8-variants", action="store_true", help="fidelity: other quantizer settings too")
    parser.add_argument("--reviews", type=int, default=48, help="speed: reviews (IMDB lengths)")
    parser.add_argument("--rounds", type=int, default=3, help="speed: rounds over every engine")
    parser.add_argument("--rows", type=int, default=200, help="batch: reviews in the corpus")
    parser.add_argument("--repeats", type=int, default=1, help="batch, serve: runs of each contender")
    parser.add_argument("--clients", type=int, default=16, help="serve: closed-loop clients")
    parser.add_argument("--duration", type=float, default=30, help="serve: seconds of load per run")
    options = parser.parse_args(argv)
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("SENTIMENT_ONNX_CACHE", str(out / "onnx-cache"))
    print(f"python -m benchmarks engines {' '.join(argv if argv is not None else sys.argv[1:])}", flush=True)
    if options.mode == "fidelity":
        result = fidelity(out, options.train, options.test, options.epochs, options.int8_variants)
    elif options.mode == "speed":
        result = speed(out, options.reviews, options.rounds)
    elif options.mode == "batch":
        result = batch(out, options.rows, options.repeats)
    else:
        result = serve(out, options.clients, options.duration, options.repeats)
    result = {"mode": options.mode, "cpu": cpu_name(), "flags": cpu_flags(), **result}
    (out / f"{options.mode}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
