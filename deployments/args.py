"""`ServeArgs`: every option of the online endpoint, typed, with the shared `ModelConfig` inside.

``serve.yaml``'s ``args:`` section and ``sentiment serve`` flags are read into this one object;
`deployments.builder.build_app` turns it into Serve deployment options. Nothing here imports ray.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_core import PydanticCustomError

from sentiment.config import ModelConfig, parse_section

# With num_gpus "auto" on a cluster that has GPUs, four replicas share each card: BERT-large in
# bf16 needs under 1 GiB of weights, so one replica alone leaves most of a modern GPU idle.
AUTO_GPU_FRACTION = 0.25
DEFAULT_API_KEY_ENV = "SENTIMENT_API_KEY"
# Tokens one replica gathers from concurrent requests into one batch by default. The classifier
# splits a gathered batch into forward passes of its own budget, so this only bounds how much work
# one batch (and the latency of its requests) may hold.
DEFAULT_GATHER_TOKENS = 16384
# A client told "busy, retry in N s" after this long can go elsewhere; one that waited longer has
# usually given up already (many HTTP clients time out after 10-30 s).
DEFAULT_MAX_QUEUE_WAIT_S = 5.0


def _invalid(message: str) -> PydanticCustomError:
    # Unlike ValueError, a custom error keeps pydantic from prefixing the message with "Value error, ".
    return PydanticCustomError("invalid_serve_args", message)


class ActorOptions(BaseModel):
    """Resources each replica reserves from Ray (Serve's ``ray_actor_options``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description=(
            "Logical CPUs per replica. Ray sets OMP_NUM_THREADS to this, so it is also the number of threads "
            "a CPU replica's forward pass uses (never more than the CPUs it may use). 'auto': 1 for a GPU "
            "replica (its CPU work is tokenizing); for a CPU replica, every CPU of the largest node, so one "
            "replica per node runs its forward passes on all the cores."
        ),
    )
    num_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description=(
            f"GPUs per replica; a fraction packs several replicas on one card. 'auto': {AUTO_GPU_FRACTION} "
            "when the cluster has GPUs (four replicas per card), else 0 (CPU replicas)."
        ),
    )


class AutoscalingArgs(BaseModel):
    """Serve's ``autoscaling_config``; the defaults suit GPU replicas that take tens of seconds to start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0, description="Fewest replicas, even when idle.")
    max_replicas: int = Field(4, ge=1, description="Most replicas; 4 fills one GPU at 0.25 GPU each.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time; None: min_replicas.")
    target_ongoing_requests: float = Field(
        32,
        gt=0,
        description=(
            "Ongoing requests per replica the autoscaler aims for. Half a full batch: a replica keeps "
            "its batches well filled without letting requests queue for more than a batch or two."
        ),
    )
    upscale_delay_s: float = Field(10, ge=0, description="How long load must stay high before adding replicas.")
    downscale_delay_s: float = Field(
        300, ge=0, description="How long load must stay low before removing replicas (a GPU replica is slow to start)."
    )
    look_back_period_s: float = Field(
        30,
        gt=10,
        description=(
            "Window over which ongoing requests are averaged; longer than Serve's 10 s metrics interval "
            "(Serve warns otherwise), so a short spike does not add a slow-starting replica."
        ),
    )

    @model_validator(mode="after")
    def _check_range(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise _invalid(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise _invalid(
                f"initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                f"({self.min_replicas}) and max_replicas ({self.max_replicas})"
            )
        return self


class ServeArgs(BaseModel):
    """The online endpoint: which model, how many replicas with what resources, batching and request limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = Field(default_factory=ModelConfig, description="The model every replica loads.")
    name: str = Field("SentimentClassifier", min_length=1, description="Deployment name.")
    num_replicas: int | None = Field(
        None, ge=1, description="A fixed number of replicas. None: autoscale as `autoscaling` says."
    )
    autoscaling: AutoscalingArgs = Field(
        default_factory=AutoscalingArgs, description="Autoscaling bounds and pace; used when num_replicas is None."
    )
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions, description="Resources per replica.")
    max_ongoing_requests: int = Field(
        1024,
        ge=1,
        description=(
            "Requests one replica holds at once (Serve's max_ongoing_requests). High on purpose: the replica "
            "bounds its own queue by time (max_queue_wait_s). Requests Serve cannot hand to a full replica wait "
            "in its router, which retries them with backoff: measured on 2 CPUs with a tiny model, 256 clients "
            "got 15 answers/s with 128 here against 123/s with 512. At least the batch's text count, or "
            "batches never fill."
        ),
    )
    max_queued_requests: int = Field(
        1024,
        ge=1,
        description=(
            "Requests a caller (the HTTP proxy) queues for this deployment when every replica is full; "
            "beyond it the proxy answers 503 at once instead of growing the queue."
        ),
    )
    gather_max_texts: int | None = Field(
        None,
        ge=1,
        description=(
            "Most texts one replica gathers from concurrent requests into one batch. None: the model's "
            "forward_max_inputs. The classifier then packs the batch into forward passes itself."
        ),
    )
    gather_max_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "Most tokens (all windows of all texts) in one gathered batch; the classifier splits it into "
            f"forward passes of model.forward_max_tokens. None: {DEFAULT_GATHER_TOKENS}, or model.forward_max_tokens "
            "if that is larger. "
            "A single request over the budget runs alone."
        ),
    )
    gather_wait_s: float = Field(
        # 0, as Triton's dynamic batcher defaults to: under load, batches fill while the previous
        # one runs, so a wait only adds latency to a lone request.
        0.0,
        ge=0,
        description=(
            "How long a request that finds the replica idle waits for others before its batch runs. "
            "Requests that arrive while a batch runs need no wait: they all go into the next batch."
        ),
    )
    max_queue_wait_s: float | None = Field(
        DEFAULT_MAX_QUEUE_WAIT_S,
        gt=0,
        description=(
            "Shed, don't stall: a request that finds more work queued on its replica than the replica runs in "
            "this many seconds (estimated from its recent batches) is answered at once with 503 'overloaded' and "
            "Retry-After, instead of waiting. None: never refuse; requests wait for their turn."
        ),
    )
    proxy_retry_after_s: float = Field(
        1.0,
        ge=0,
        description=(
            "Retry-After of the plain-text 503 Serve's HTTP proxy answers once max_queued_requests requests wait "
            "for full replicas (Serve's backpressure_config)."
        ),
    )
    max_constructor_retry_count: int = Field(
        1,
        ge=1,
        description=(
            "Replica starts that may fail before Serve declares a new deployment, or a rolling update of one, "
            "failed (Serve's default is 20: minutes of retries when a model cannot load). 1 suits a local "
            "model that fails the same way every time; the cluster configs use 3, for nodes that download "
            "the model on their own. Replicas that fail after the deployment is up are always replaced."
        ),
    )
    max_texts_per_request: int = Field(64, ge=1, description="Most texts in one request; more gets 413.")
    max_chars_per_text: int = Field(100_000, ge=1, description="Most characters in one text; more gets 413.")
    api_key: SecretStr | None = Field(
        None,
        description=(
            "Require 'Authorization: Bearer <key>' on every route but /healthz and the demo page (GET /). "
            "Prefer api_key_env: a key written here ends up in config files."
        ),
    )
    api_key_env: str = Field(
        DEFAULT_API_KEY_ENV,
        min_length=1,
        description=(
            "Environment variable a replica reads the API key from when api_key is unset; unset or empty: no key."
        ),
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> ServeArgs:
        if self.num_replicas is not None and "autoscaling" in self.model_fields_set:
            raise _invalid("give either num_replicas (a fixed count) or autoscaling, not both")
        texts = self.effective_gather_max_texts
        if self.max_ongoing_requests < texts:
            raise _invalid(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least the batch size "
                f"({texts} texts, gather_max_texts or model.forward_max_inputs): with fewer, batches never fill"
            )
        return self

    @property
    def effective_gather_max_texts(self) -> int:
        return self.gather_max_texts or self.model.forward_max_inputs

    @property
    def effective_gather_max_tokens(self) -> int:
        if self.gather_max_tokens is not None:
            return self.gather_max_tokens
        model_budget = self.model.forward_max_tokens
        return DEFAULT_GATHER_TOKENS if model_budget == "auto" else max(model_budget, DEFAULT_GATHER_TOKENS)

    def resolve_api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The key requests must carry: `api_key`, else the `api_key_env` variable, else None (no key)."""
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        value = (os.environ if environ is None else environ).get(self.api_key_env, "")
        return value or None


def parse_serve_args(data: ServeArgs | Mapping[str, Any], source: str = "args") -> ServeArgs:
    """A `ServeArgs` from a mapping (a YAML ``args:`` section), with errors that name each bad field."""
    return parse_section(ServeArgs, data, source)
