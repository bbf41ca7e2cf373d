"""The three ASGI middlewares alone, around small stand-in apps: no model, no Ray.

Their answers come from the ``respond`` they are handed; here a stand-in that shows which error it
was given, so the tests see what each middleware refused, and why. How the real app answers each
refusal (the routes' error table) is tested in `tests/test_routes.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.responses import PlainTextResponse, Response
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from deployments.middleware import ApiKey, BodySizeLimit, RequestMetrics, needs_key, relative_path

KEY = "middleware-test-key"


def respond(error: Exception) -> Response:
    """Stand-in for the routes' error table: the error's class and message, status 499."""
    return PlainTextResponse(f"{type(error).__name__}: {error}", status_code=499)


class RecordedRequests:
    """Stand-in for `EndpointMetrics`: what `RequestMetrics` recorded."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []

    def record_request(self, route: str, status: int) -> None:
        self.requests.append((route, status))


async def read_body(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that reads the whole body, then answers how many bytes it got (or that the client left)."""
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            await PlainTextResponse("the client went away", status_code=400)(scope, receive, send)
            return
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await PlainTextResponse(f"read {received} bytes")(scope, receive, send)


# -- which requests need the key ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("GET", "/healthz", False),
        ("GET", "/", False),
        ("HEAD", "/", False),
        ("get", "/", False),
        ("POST", "/", True),
        ("GET", "/readyz", True),
        ("GET", "/info", True),
        ("POST", "/v1/classify", True),
        ("GET", "/openapi.json", True),
        ("GET", "/docs", True),
        ("GET", "/nowhere", True),
    ],
)
def test_only_liveness_and_the_demo_page_need_no_key(method: str, path: str, needed: bool) -> None:
    assert needs_key(method, path) is needed


@pytest.mark.parametrize(
    ("path", "root_path", "relative"),
    [("/info", "", "/info"), ("/guarded/info", "/guarded", "/info"), ("/guarded", "/guarded", "/"), ("", "", "/")],
)
def test_paths_are_judged_below_the_route_prefix(path: str, root_path: str, relative: str) -> None:
    assert relative_path({"type": "http", "path": path, "root_path": root_path}) == relative


# -- ApiKey ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed() -> TestClient:
    async def ok(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("passed")(scope, receive, send)

    # Not entered: these stand-in apps speak HTTP only, no lifespan.
    return TestClient(ApiKey(ok, key=KEY, respond=respond))


@pytest.mark.parametrize(
    "authorization",
    [None, "", f"Bearer {KEY}x", f"Basic {KEY}", KEY, f"Bearer{KEY}", f"Bearer {KEY[:-1]}"],
)
def test_a_missing_or_wrong_key_is_refused_before_the_app_runs(keyed: TestClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = keyed.post("/v1/classify", headers=headers)
    assert (response.status_code, response.text) == (
        499,
        "Unauthorized: missing or wrong API key: send 'Authorization: Bearer <key>'",
    )


@pytest.mark.parametrize("authorization", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER   {KEY}  "])
def test_the_right_key_passes_whatever_the_case_of_the_scheme(keyed: TestClient, authorization: str) -> None:
    response = keyed.post("/v1/classify", headers={"Authorization": authorization})
    assert (response.status_code, response.text) == (200, "passed")


def test_open_paths_pass_without_a_key(keyed: TestClient) -> None:
    assert keyed.get("/healthz").text == "passed"
    assert keyed.get("/").text == "passed"
    assert keyed.post("/").status_code == 499


def test_without_a_key_configured_everything_passes() -> None:
    async def ok(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("passed")(scope, receive, send)

    assert TestClient(ApiKey(ok, key=None, respond=respond)).post("/v1/classify").text == "passed"


# -- BodySizeLimit -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited() -> TestClient:
    return TestClient(BodySizeLimit(read_body, max_body_bytes=1000, respond=respond))


def test_a_body_within_the_limit_reaches_the_app_whole(limited: TestClient) -> None:
    assert limited.post("/", content=b"x" * 1000).text == "read 1000 bytes"

    def chunks() -> Iterator[bytes]:
        yield from [b"x" * 300] * 3

    assert limited.post("/", content=chunks()).text == "read 900 bytes"


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read(limited: TestClient) -> None:
    response = limited.post("/", content=b"x" * 1001)
    assert (response.status_code, response.text) == (499, "TooLarge: body has 1001 bytes; at most 1000")


def test_a_chunked_body_growing_past_the_limit_is_refused_and_the_apps_own_answer_dropped(
    limited: TestClient,
) -> None:
    def chunks() -> Iterator[bytes]:
        yield from [b"x" * 300] * 10

    response = limited.post("/", content=chunks())
    # The app was told the client went away; its 400 never reached the client.
    assert (response.status_code, response.text) == (499, "TooLarge: body exceeds 1000 bytes")


# -- RequestMetrics ----------------------------------------------------------------------------


def metered_app(recorded: RecordedRequests) -> TestClient:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    # As the replica stacks them: metrics outermost, so refusals count too.
    app.add_middleware(ApiKey, key=KEY, respond=respond)
    app.add_middleware(RequestMetrics, metrics=recorded)  # type: ignore[arg-type]
    return TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {KEY}"})


def test_requests_are_counted_by_route_template_and_status_refusals_and_bugs_too() -> None:
    recorded = RecordedRequests()
    with metered_app(recorded) as client:
        assert client.get("/items/3").status_code == 200
        assert client.get("/items/4").status_code == 200
        assert client.get("/items/x").status_code == 422
        assert client.get("/nowhere").status_code == 404
        assert client.get("/items/5", headers={"Authorization": "Bearer wrong"}).status_code == 499
        assert client.get("/bug").status_code == 500
    assert recorded.requests == [
        ("/items/{item_id}", 200),
        ("/items/{item_id}", 200),
        ("/items/{item_id}", 422),
        ("unmatched", 404),
        # Refused before routing: no template is known, and raw paths would make the label values unbounded.
        ("unmatched", 499),
        ("/bug", 500),
    ]


def test_non_http_scopes_pass_through_untouched() -> None:
    seen: list[str] = []

    async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        message: Message = await receive()
        assert message["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        await send({"type": "lifespan.shutdown.complete"})

    recorded = RecordedRequests()
    app: Any = RequestMetrics(ApiKey(BodySizeLimit(lifespan_app, 10, respond), KEY, respond), recorded)  # type: ignore[arg-type]
    with TestClient(app):
        pass
    assert seen == ["lifespan"]
    assert recorded.requests == []
