"""`benchmarks.harness`: the closed-loop load generator's bounds and outcomes, the tables, the results section."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks.harness import Load, closed_loop, markdown_table, percentile, ratio, write_section


class Server(ThreadingHTTPServer):
    """Answers every POST by its path: ``/ok`` 200, ``/shed`` a replica's JSON 503, ``/proxy`` a plain 503."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.bodies: list[dict[str, object]] = []
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.bodies.append(body)
        status, content_type = {"/ok": (200, "application/json"), "/shed": (503, "application/json")}.get(
            self.path, (503, "text/plain")
        )
        answer = b"{}" if content_type == "application/json" else b"overloaded"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(answer)))
        self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    server = Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_load_stops_at_the_request_count_and_counts_texts(server: Server) -> None:
    payloads = [{"texts": ["a", "b"]}, {"texts": ["c"]}]
    load = asyncio.run(closed_loop(f"{server.base}/ok", payloads, clients=3, duration_s=120, max_requests=7, warmup=2))
    assert len(load.answered) == 7
    assert load.errors == 0
    # Payloads cycle in order: 4 of two texts and 3 of one.
    assert load.texts == 4 * 2 + 3 * 1
    assert len(server.bodies) == 2 + 7  # the untimed warm-up, then exactly the bound
    assert all(latency >= 0 and finished <= load.seconds for finished, latency in load.answered)


def test_load_starts_no_request_once_its_time_is_up(server: Server) -> None:
    load = asyncio.run(closed_loop(f"{server.base}/ok", [{"text": "a"}], clients=4, duration_s=0, warmup=1))
    assert (len(load.answered), load.errors, len(server.bodies)) == (0, 0, 1)


def test_refusals_are_counted_apart_from_answers(server: Server) -> None:
    for path, kind in (("/shed", "503 replica"), ("/proxy", "503 proxy")):
        load = asyncio.run(
            closed_loop(f"{server.base}{path}", [{"text": "a"}], 2, 120, max_requests=5, retry_after_cap_s=5.0)
        )
        assert (len(load.answered), load.texts, dict(load.failures)) == (0, 0, {kind: 5})


def test_load_goes_to_this_machine_only() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        asyncio.run(closed_loop("http://example.com/v1/classify", [{"text": "a"}], 1, 1))


def test_summary_and_windows_come_from_the_answers() -> None:
    # Ten answers of 100..1000 ms finishing across the first two 10-second windows, 2 refusals.
    load = Load(clients=2, seconds=25.0, texts=10)
    load.answered = [(float(i) * 2, (i + 1) / 10) for i in range(10)]
    load.failures.update({"503 replica": 2})
    summary = load.summary()
    assert (summary["requests"], summary["errors"], summary["texts_per_s"]) == (10, 2, 0.4)
    assert (summary["p50_ms"], summary["p99_ms"]) == (500.0, 1000.0)
    assert load.windows(10.0) == [
        {"from_s": 0.0, "answered_per_s": 0.5, "p99_ms": 500.0},
        {"from_s": 10.0, "answered_per_s": 0.5, "p99_ms": 1000.0},
    ]
    assert percentile([], 99) != percentile([], 99)  # NaN: nothing answered


def test_markdown_table_aligns_number_columns_and_refuses_ragged_rows() -> None:
    assert markdown_table(["system", "texts/s"], [["ours", "1.50"], ["baseline", ""]], right=[1]).splitlines() == [
        "| system | texts/s |",
        "|---|---:|",
        "| ours | 1.50 |",
        "| baseline |  |",
    ]
    with pytest.raises(ValueError, match="1 cells under 2 columns"):
        markdown_table(["a", "b"], [["only one"]])


def test_ratio_is_a_dash_without_a_reference() -> None:
    assert (ratio(3.0, 2.0), ratio(3.0, None), ratio(None, 2.0), ratio(3.0, 0.0)) == ("1.50x", "-", "-", "-")


def test_results_section_is_replaced_in_place(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nbefore\n")
    write_section(results, "first run", "benchmarks.run")
    results.write_text(results.read_text() + "\nafter\n")
    write_section(results, "second run", "benchmarks.run")
    text = results.read_text()
    start, end = "<!-- benchmarks.run: start -->", "<!-- benchmarks.run: end -->"
    assert text.count(start) == text.count(end) == 1
    assert "second run" in text
    assert "first run" not in text
    assert text.index("before") < text.index(start) < text.index("after")


def test_a_sampler_summarises_only_the_samples_taken_in_a_window() -> None:
    from benchmarks.harness import Sampler

    sampler = Sampler(lambda: 0.0, interval_s=1, enabled=False)
    sampler.times, sampler.samples = [10.0, 11.0, 12.0, 13.0], [0.0, 90.0, 100.0, 5.0]
    assert sampler.summary() == {"samples": 4, "mean": 48.75, "max": 100.0}
    assert sampler.summary(11.0, 12.0) == {"samples": 2, "mean": 95.0, "max": 100.0}
    empty = sampler.summary(20.0, None)
    assert empty["samples"] == 0
