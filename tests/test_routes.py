"""The replica's routes in-process: the FastAPI app on a tiny real classifier, no Ray, no Serve.

What a client sees from each route (answers, TEI and Inference API shapes, every error, the API
key) does not depend on Serve, so it is tested here, fast; `tests/test_deployments.py` keeps what
needs Serve (batching across concurrent HTTP requests, metrics, the proxy's backpressure, fractional
GPUs, autoscaling, the Hugging Face client over real HTTP).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from deployments.api import create_api
from deployments.app import SentimentServer
from deployments.args import ServeArgs
from sentiment.config import ModelConfig
from sentiment.model import SentimentClassifier
from tests.test_deployments import (
    API_KEY,
    MAIN_LIMITS,
    MAX_CHARS,
    MAX_TEXTS,
    assert_healthy,
    assert_same_predictions,
    expected,
    review,
)


def in_process(checkpoint: Path, **overrides: Any) -> Iterator[TestClient]:
    model = ModelConfig(model_id=str(checkpoint), device="cpu")
    server = SentimentServer(ServeArgs(model=model, **overrides), classifier=SentimentClassifier(model))
    with TestClient(create_api(server)) as session:
        yield session


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path) -> Iterator[TestClient]:
    """The limits of test_deployments' ``main`` app."""
    yield from in_process(tiny_checkpoint, **MAIN_LIMITS)


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint: Path) -> Iterator[TestClient]:
    yield from in_process(tiny_checkpoint, api_key=API_KEY)


def test_classify_returns_the_core_classifiers_predictions_in_input_order(
    client: TestClient, classifier: SentimentClassifier
) -> None:
    rng = random.Random(1)
    texts = [review(n, rng) for n in (3, 700, 40, 1, 250, 900)]  # two over 512 tokens, cut head_tail
    response = client.post("/v1/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == classifier.config.model_id
    assert_same_predictions(body["predictions"], expected(classifier, texts))
    assert [p["truncated"] for p in body["predictions"]] == [False, True, False, False, False, True]

    single = client.post("/v1/classify", json={"text": texts[1], "long_text": "chunks"})
    assert single.status_code == 200, single.text
    assert_same_predictions(single.json()["predictions"], expected(classifier, [texts[1]], "chunks"))


def test_predict_route_is_tei_compatible(client: TestClient, classifier: SentimentClassifier) -> None:
    text = "the acting was wonderful but the plot was weak"
    scores = classifier.predict([text])[0].scores
    ranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)

    one = client.post("/predict", json={"inputs": text}).json()
    assert [item["label"] for item in one] == [label for label, _ in ranked]
    assert [item["score"] for item in one] == pytest.approx([score for _, score in ranked], abs=1e-5)

    many = client.post("/predict", json={"inputs": [text, "bad"]}).json()
    assert len(many) == 2
    assert [item["label"] for item in many[0]] == [item["label"] for item in one]
    assert [item["score"] for item in many[0]] == pytest.approx([item["score"] for item in one], abs=1e-5)
    assert many[1][0]["score"] >= many[1][1]["score"]

    raw = client.post("/predict", json={"inputs": text, "raw_scores": True}).json()
    assert [item["label"] for item in raw] == [label for label, _ in ranked]
    assert [item["score"] for item in raw] == pytest.approx([math.log(score) for _, score in ranked], abs=1e-4)


def test_predict_truncation_options(client: TestClient, classifier: SentimentClassifier) -> None:
    long_text = review(700, random.Random(2))
    refused = client.post("/predict", json={"inputs": ["short", long_text], "truncate": False})
    assert refused.status_code == 413
    assert refused.json()["error_type"] == "too_large"
    assert "inputs[1] has 702 tokens" in refused.json()["error"]

    tail = client.post("/predict", json={"inputs": long_text, "truncate": True, "truncation_direction": "Left"})
    assert tail.status_code == 200
    want = classifier.predict([long_text], long_text="tail")[0].scores
    assert {item["label"]: item["score"] for item in tail.json()} == pytest.approx(want, abs=1e-5)


def test_health_readiness_info_and_docs(client: TestClient, classifier: SentimentClassifier) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/info").json()
    assert info["model"] == classifier.config.model_id
    assert info["revision"] is None
    assert info["labels"] == ["neg", "pos"]
    assert info["max_length"] == 512
    assert info["long_text"] == "head_tail"
    assert (info["backend"], info["dtype"], info["device"]) == ("torch", "fp32", "cpu")
    assert (info["gather_max_texts"], info["gather_max_tokens"], info["gather_wait_s"]) == (32, 16384, 0.05)
    assert (info["max_texts_per_request"], info["max_chars_per_text"]) == (MAX_TEXTS, MAX_CHARS)
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/predict", "/", "/healthz", "/readyz", "/info"} <= set(paths)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_an_onnx_runtime_replica_answers_as_the_torch_one_does(
    precision: str, tiny_onnx: Path, tiny_onnx_int8: Path, classifier: SentimentClassifier
) -> None:
    export = {"fp32": tiny_onnx, "int8": tiny_onnx_int8}[precision]
    rng = random.Random(2)
    texts = [review(n, rng) for n in (3, 700, 40, 250)]
    for client in in_process(export):  # one client, open while the loop body runs
        info = client.get("/info").json()
        assert (info["backend"], info["dtype"], info["device"]) == ("onnxruntime", precision, "cpu")
        body = client.post("/v1/classify", json={"texts": texts}).json()
    want = expected(classifier, texts)
    got = body["predictions"]
    assert [(g["num_tokens"], g["truncated"]) for g in got] == [(w["num_tokens"], w["truncated"]) for w in want]
    # fp32: torch's scores within 1e-4; int8 (random weights) only near them.
    tolerance = 1e-4 if precision == "fp32" else 0.2
    assert [g["scores"]["pos"] for g in got] == pytest.approx([w["scores"]["pos"] for w in want], abs=tolerance)


# -- errors ------------------------------------------------------------------------------------

JSON_TYPE = {"content-type": "application/json"}
TOO_MANY = ["a"] * (MAX_TEXTS + 1)
TOO_LONG = "x" * (MAX_CHARS + 1)
HUGE_BODY = b"[" + b'"x",' * 500_000 + b'"x"]'
SIGMOID = {"function_to_apply": "sigmoid"}

ERROR_CASES: list[tuple[str, dict[str, Any], int, str, str]] = [
    # route, httpx request arguments, status, error_type, text the message must contain
    ("/v1/classify", {"content": b'{"texts": [', "headers": JSON_TYPE}, 400, "malformed", "not valid JSON"),
    ("/v1/classify", {"content": b"texts=a"}, 400, "malformed", "Content-Type: application/json"),
    ("/v1/classify", {"json": {"texts": None}}, 422, "validation", "texts must not be null"),
    ("/v1/classify", {"json": {"text": None}}, 422, "validation", "text must not be null"),
    ("/v1/classify", {"json": {"texts": []}}, 400, "empty", "texts is empty"),
    ("/v1/classify", {"json": {"texts": ["ok", 5]}}, 422, "validation", "texts[1]: Input should be a valid string"),
    ("/v1/classify", {"json": {"texts": "one string"}}, 422, "validation", "texts: Input should be a valid list"),
    ("/v1/classify", {"json": {"texts": [None]}}, 422, "validation", "texts[0]"),
    ("/v1/classify", {"json": {}}, 422, "validation", "exactly one of 'text'"),
    ("/v1/classify", {"json": [1, 2]}, 422, "validation", "body"),
    ("/v1/classify", {"json": {"texts": ["a"], "text": "b"}}, 422, "validation", "exactly one of"),
    ("/v1/classify", {"json": {"texts": ["a"], "txt": "b"}}, 422, "validation", "txt: Extra inputs are not permitted"),
    ("/v1/classify", {"json": {"texts": ["a"], "long_text": "middle"}}, 422, "validation", "long_text"),
    ("/v1/classify", {"json": {"texts": TOO_MANY}}, 413, "too_large", f"at most {MAX_TEXTS} per request"),
    (
        "/v1/classify",
        {"json": {"texts": ["a", TOO_LONG]}},
        413,
        "too_large",
        f"texts[1] has {MAX_CHARS + 1} characters",
    ),
    ("/v1/classify", {"json": {"text": TOO_LONG}}, 413, "too_large", "text has"),
    ("/v1/classify", {"json": {"texts": ["fine", "  "]}}, 400, "empty", "texts[1] is empty"),
    ("/v1/classify", {"json": {"text": ""}}, 400, "empty", "text is empty"),
    ("/v1/classify", {"content": HUGE_BODY, "headers": JSON_TYPE}, 413, "too_large", "bytes"),
    ("/predict", {"json": {"inputs": None}}, 422, "validation", "inputs"),
    ("/predict", {"json": {"inputs": []}}, 400, "empty", "inputs is empty"),
    ("/predict", {"json": {"inputs": "x", "raw_scores": "very"}}, 422, "validation", "raw_scores"),
    ("/predict", {"json": {"input": "x"}}, 422, "validation", "inputs: Field required"),
    ("/", {"json": {"inputs": "x", "parameters": SIGMOID}}, 422, "validation", "function_to_apply"),
    ("/", {"json": {"inputs": "x", "parameters": {"top_k": 0}}}, 422, "validation", "parameters.top_k"),
    ("/nowhere", {"json": {}}, 404, "not_found", "Not Found"),
]


@pytest.mark.parametrize(("route", "request_args", "status", "error_type", "message"), ERROR_CASES)
def test_bad_requests_get_a_json_error_naming_the_problem_and_the_server_stays_healthy(
    client: TestClient, route: str, request_args: dict[str, Any], status: int, error_type: str, message: str
) -> None:
    response = client.post(route, **request_args)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type
    assert message in body["error"]
    assert_healthy(client)


def test_a_chunked_body_over_the_limit_is_refused(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"texts": ['
        for _ in range(200):
            yield b'"' + b"x" * 9_000 + b'",'
        yield b'"x"]}'

    response = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error_type"] == "too_large"
    assert_healthy(client)


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("POST", "/v1/classify"),
        ("POST", "/predict"),
        ("POST", "/"),
        ("GET", "/info"),
        ("GET", "/readyz"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
    ],
)
def test_api_key_is_required_on_every_route_but_healthz(guarded: TestClient, method: str, route: str) -> None:
    body = {"texts": ["good"]} if route == "/v1/classify" else {"inputs": "good"}
    kwargs: dict[str, Any] = {"json": body} if method == "POST" else {}
    missing = guarded.request(method, route, **kwargs)
    assert missing.status_code == 401
    assert missing.json()["error_type"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = guarded.request(method, route, headers={"Authorization": f"Bearer {API_KEY}x"}, **kwargs)
    assert wrong.status_code == 401
    right = guarded.request(method, route, headers={"Authorization": f"Bearer {API_KEY}"}, **kwargs)
    assert right.status_code == 200, right.text
    assert guarded.get("/healthz").status_code == 200
