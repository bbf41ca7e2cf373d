"""Request and response bodies of the HTTP API, one pair per route.

``/v1/classify`` is this project's own shape; ``/predict`` follows Hugging Face
text-embeddings-inference; ``/`` follows the Hugging Face Inference API, which is what
``huggingface_hub.InferenceClient(model=<url>).text_classification`` posts.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from sentiment.config import LongTextStrategy


def _non_space_pattern() -> str:
    """A regex for "holds a character that is not whitespace", whitespace meaning exactly ``str.isspace``.

    The routes refuse a text that ``str.strip`` empties (`deployments.routes`); regex ``\\S``
    disagrees on a few control characters (U+001C..U+001F), so the class is spelt out, in escapes
    that both Python and ECMA-262 (JSON Schema's regex dialect) read the same way.
    """
    spaces = [code for code in range(0x10000) if chr(code).isspace()]
    ranges: list[tuple[int, int]] = []
    for code in spaces:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    parts = [f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges]
    return f"[^{''.join(parts)}]"


# What the routes refuse as empty: a text must hold a character that is not whitespace.
NON_EMPTY_PATTERN = _non_space_pattern()


def _whole_number(value: Any) -> Any:
    # JSON Schema counts 3.0 as an integer; strict validation alone would refuse it.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Positive = Annotated[int, Field(ge=1), BeforeValidator(_whole_number)]


def _no_default(schema: dict[str, Any]) -> None:
    # A field that may be left out but not sent as null: the document shows no null default.
    schema.pop("default", None)


class _Body(BaseModel):
    # A misspelt field is an error that names it, not a silently ignored option; and a value of the
    # wrong JSON type (0 for false, "1" for 1) is an error, as the OpenAPI document says, not coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


class ClassifyRequest(_Body):
    """``POST /v1/classify``: one text or a list of them."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["texts"]}]},
    )

    texts: list[str] | SkipJsonSchema[None] = Field(
        None, description="Texts to classify; answers come back in this order.", json_schema_extra=_no_default
    )
    text: str | SkipJsonSchema[None] = Field(
        None, description="A single text; give this or `texts`, not both.", json_schema_extra=_no_default
    )
    long_text: LongTextStrategy | None = Field(
        None, description="How to cut a text longer than the model's limit; default: the server's setting."
    )

    @model_validator(mode="after")
    def _one_of_text_or_texts(self) -> ClassifyRequest:
        for name in ("texts", "text"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} must not be null")
        if (self.texts is None) == (self.text is None):
            raise ValueError("give exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self


class PredictionBody(BaseModel):
    label: str = Field(description="The most probable label.")
    score: float = Field(description="Probability of `label`.")
    scores: dict[str, float] = Field(description="Probability of every label.")
    num_tokens: int = Field(description="Tokens in the whole text, special tokens included, before any cut.")
    truncated: bool = Field(description="Whether the text was longer than the model's limit and was cut.")


class ClassifyResponse(BaseModel):
    model: str = Field(description="The model that answered (hub id or checkpoint directory).")
    predictions: list[PredictionBody] = Field(description="One prediction per text, in input order.")


class LabelScore(BaseModel):
    label: str
    score: float


class PredictRequest(_Body):
    """``POST /predict``, as in text-embeddings-inference."""

    inputs: str | list[str] = Field(description="One text, or a list of texts.")
    raw_scores: bool = Field(
        False,
        description=(
            "Scores as log-probabilities instead of probabilities: the logits shifted by a constant per "
            "text, so differences between labels are the logits' differences."
        ),
    )
    truncate: bool | None = Field(
        None,
        description=(
            "false: a text longer than the model's limit is an error (413) instead of being cut. "
            "Default: cut it by the server's long_text strategy."
        ),
    )
    truncation_direction: Literal["left", "right", "Left", "Right"] | None = Field(
        None, description="Which end to cut from: 'right' keeps the head, 'left' keeps the tail."
    )


class InferenceParameters(_Body):
    top_k: Positive | None = Field(None, description="Return only the k most probable labels.")
    function_to_apply: Literal["softmax", "none"] | None = Field(
        None,
        description=(
            "'softmax' (default): probabilities. 'none': log-probabilities (see /predict raw_scores). "
            "The Inference API's 'sigmoid' is refused: the classifier keeps probabilities, not logits."
        ),
    )

    @field_validator("function_to_apply", mode="before")
    @classmethod
    def _no_sigmoid(cls, value: Any) -> Any:
        if value == "sigmoid":
            raise ValueError("'sigmoid' is not supported; use 'softmax' or 'none'")
        return value


class InferenceRequest(_Body):
    """``POST /``, as the Hugging Face Inference API (and its Python client) sends it."""

    inputs: str | list[str] = Field(description="One text, or a list of texts.")
    parameters: InferenceParameters = Field(default_factory=InferenceParameters)


class ErrorType(str, Enum):
    """What went wrong, as clients see it in ``error_type``."""

    MALFORMED = "malformed"
    """The body is not JSON."""
    VALIDATION = "validation"
    """A field is missing, null, of the wrong type or not an allowed value."""
    EMPTY = "empty"
    """No texts, or an empty text."""
    TOO_LARGE = "too_large"
    """More texts, characters or bytes than the configured limits allow."""
    UNAUTHORIZED = "unauthorized"
    """The API key is missing or wrong."""
    NOT_FOUND = "not_found"
    """No such route, or the route does not take this method."""
    BACKEND = "backend"
    """The model failed on a well-formed request."""
    UNHEALTHY = "unhealthy"
    """The replica is not ready (still warming up, or its model keeps failing)."""
    OVERLOADED = "overloaded"
    """The replica's queue already holds more work than it runs in `ServeArgs.max_queue_wait_s`; retry later."""
    INTERNAL = "internal"
    """A bug in this server; the replica keeps serving."""


class ErrorBody(BaseModel):
    """Every error a route answers itself (TEI's shape); Serve's proxy answers plain text (see the README)."""

    error: str = Field(description="What went wrong, naming the field and the limit where there is one.")
    error_type: ErrorType


def document_limits(openapi: dict[str, Any], max_texts: int, max_chars: int) -> None:
    """Write one server's request limits into its OpenAPI document, so that it promises what the routes accept.

    The routes check these themselves (`deployments.routes`), to answer 400/413 with a message
    naming the text; here they become ``minItems``/``maxItems`` and ``maxLength``/``pattern``.
    """
    schemas = openapi.get("components", {}).get("schemas", {})
    fields = {
        "ClassifyRequest": ("text", "texts"),
        "PredictRequest": ("inputs",),
        "InferenceRequest": ("inputs",),
        "VllmClassifyRequest": ("input",),
    }
    for model, names in fields.items():
        properties = schemas.get(model, {}).get("properties", {})
        for name in names:
            if name in properties:
                _constrain(properties[name], max_texts, max_chars)


def _constrain(schema: dict[str, Any], max_texts: int, max_chars: int) -> None:
    for branch in schema.get("anyOf", []):
        _constrain(branch, max_texts, max_chars)
    if schema.get("type") == "string":
        schema.update(minLength=1, maxLength=max_chars, pattern=NON_EMPTY_PATTERN)
    elif schema.get("type") == "array":
        schema.update(minItems=1, maxItems=max_texts)
        _constrain(schema.setdefault("items", {"type": "string"}), max_texts, max_chars)


class InfoResponse(BaseModel):
    model: str
    revision: str | None
    labels: list[str]
    max_length: int
    long_text: str
    head_tokens: int
    backend: str = Field(description="What runs the forward pass: torch, or onnxruntime (CPU).")
    dtype: str = Field(description="Precision of the weights: fp32, bf16, fp16, or int8 (onnxruntime).")
    threads: int = Field(description="CPU threads of one forward pass.")
    device: str = Field(description="Device the model runs on, with its index: cpu or cuda:N.")
    reserved_gpus: list[str] | None = Field(
        description="GPU ids Ray reserved for this replica (empty: none, so it runs on the CPU)."
    )
    gpu_memory_fraction: float | None = Field(description="Share of the card this replica caps its CUDA memory to.")
    gpu_memory_cap_bytes: int | None = Field(description="That cap in bytes; null without a cap or on a CPU.")
    gpu_memory_peak_bytes: int | None = Field(
        description="Most CUDA memory this replica has held at once since it started; null on a CPU."
    )
    forward_max_tokens: int = Field(description="Token budget of one forward pass.")
    forward_max_inputs: int = Field(description="Most inputs of one forward pass.")
    gather_max_texts: int = Field(description="Most texts gathered from concurrent requests into one batch.")
    gather_max_tokens: int = Field(description="Most tokens gathered into one batch.")
    gather_wait_s: float
    max_ongoing_requests: int
    max_queue_wait_s: float | None = Field(description="Queued work (seconds) above which requests get 503.")
    queue_wait_s: float = Field(description="Seconds of work queued or running on this replica now.")
    max_texts_per_request: int
    max_chars_per_text: int
    replica_gpus: float = Field(description="GPUs this replica reserved from Ray.")
    replica: str | None = Field(description="Serve's id of the replica that answered.")


# -- vLLM's classify protocol (POST /classify, and POST /v1/classify with an "input" body) -----------


class VllmClassifyRequest(_Body):
    """vLLM's ``/classify`` body (what vLLM, SGLang and Dynamo clients post): one text or a list of them.

    vLLM's optional fields are taken where this server can honour them and refused, naming the field,
    where it cannot; an unknown field is refused as on every other route.
    """

    input: str | list[str] = Field(description="One text, or a list of texts; answers come back in this order.")
    model: str | None = Field(None, description="The served model's name (`GET /v1/models`); default: it.")
    user: str | None = Field(None, description="The caller, for the caller's own records; not used.")
    priority: int | None = Field(None, description="vLLM's scheduling priority; accepted and not used.")
    truncate_prompt_tokens: Literal[-1] | None = Field(
        None,
        description=(
            "Only -1 (cut at the model's limit) is taken: long texts are cut by the server's long_text strategy."
        ),
    )
    add_special_tokens: Literal[True] | None = Field(None, description="Only true: the model needs [CLS] and [SEP].")
    use_activation: Literal[True] | None = Field(
        None, description="Only true: the answer holds probabilities (softmax)."
    )
    activation: Literal[True] | None = Field(None, description="vLLM's older name of use_activation; only true.")
    softmax: Literal[True] | None = Field(None, description="vLLM's older name of use_activation; only true.")

    # Before the type check, so the refusal says why rather than "Input should be True".
    @field_validator("truncate_prompt_tokens", mode="before")
    @classmethod
    def _only_model_limit(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value != -1:
            raise ValueError("only -1 (cut at the model's limit, by the server's long_text strategy) is supported")
        return value

    @field_validator("add_special_tokens", "use_activation", "activation", "softmax", mode="before")
    @classmethod
    def _only_true(cls, value: Any) -> Any:
        if value is False:
            raise ValueError("only true is supported: this server answers probabilities of inputs with special tokens")
        return value


class VllmClassification(BaseModel):
    index: int = Field(description="Position of the text in `input`.")
    label: str = Field(description="The most probable label.")
    probs: list[float] = Field(description="Probability of every label, in the model's label order.")
    num_classes: int


class VllmUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the inputs, special tokens included, before any cut.")
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class VllmClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(description="Unix time of the answer.")
    model: str
    data: list[VllmClassification]
    usage: VllmUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the replica started.")
    owned_by: str = "ray-sentiment"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    """``GET /v1/models``, in OpenAI's list shape."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
