"""Request and response bodies of the HTTP API, one pair per route.

``/v1/classify`` is this project's own shape; ``/predict`` follows Hugging Face
text-embeddings-inference; ``/`` follows the Hugging Face Inference API, which is what
``huggingface_hub.InferenceClient(model=<url>).text_classification`` posts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sentiment.config import LongTextStrategy


class _Body(BaseModel):
    # A misspelt field is an error that names it, not a silently ignored option.
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Body):
    """``POST /v1/classify``: one text or a list of them."""

    texts: list[str] | None = Field(None, description="Texts to classify; answers come back in this order.")
    text: str | None = Field(None, description="A single text; give this or `texts`, not both.")
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
    top_k: int | None = Field(None, ge=1, description="Return only the k most probable labels.")
    function_to_apply: Literal["softmax", "none", "sigmoid"] | None = Field(
        None,
        description=(
            "'softmax' (default): probabilities. 'none': log-probabilities (see /predict raw_scores). "
            "'sigmoid' is refused: the classifier keeps probabilities, not logits."
        ),
    )


class InferenceRequest(_Body):
    """``POST /``, as the Hugging Face Inference API (and its Python client) sends it."""

    inputs: str | list[str] = Field(description="One text, or a list of texts.")
    parameters: InferenceParameters = Field(default_factory=InferenceParameters)


class InfoResponse(BaseModel):
    model: str
    revision: str | None
    labels: list[str]
    max_length: int
    long_text: str
    head_tokens: int
    dtype: str = Field(description="Precision of the weights and activations: fp32, bf16 or fp16.")
    device: str = Field(description="Device the model runs on, with its index: cpu or cuda:N.")
    reserved_gpus: list[str] | None = Field(
        description="GPU ids Ray reserved for this replica (empty: none, so it runs on the CPU)."
    )
    gpu_memory_fraction: float | None = Field(description="Share of the card this replica caps its CUDA memory to.")
    gpu_memory_cap_bytes: int | None = Field(description="That cap in bytes; null without a cap or on a CPU.")
    gpu_memory_peak_bytes: int | None = Field(
        description="Most CUDA memory this replica has held at once since it started; null on a CPU."
    )
    max_batch_tokens: int = Field(description="Token budget of one forward pass.")
    max_batch_size: int = Field(description="Most inputs of one forward pass.")
    batch_max_texts: int = Field(description="Most texts gathered from concurrent requests into one batch.")
    batch_max_tokens: int = Field(description="Most tokens gathered into one batch.")
    batch_wait_timeout_s: float
    max_ongoing_requests: int
    max_texts_per_request: int
    max_chars_per_text: int
    replica_gpus: float = Field(description="GPUs this replica reserved from Ray.")
    replica: str | None = Field(description="Serve's id of the replica that answered.")
