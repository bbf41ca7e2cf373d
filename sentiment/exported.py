"""The ONNX export directory: what `sentiment export` writes and the ONNX Runtime engine reads, without torch.

    OUT_DIR/
      model.onnx            the graph, with ONNX Runtime's BERT fusions (int8: weights quantized)
      manifest.json         where it came from and how it was made (`Manifest`)
      config.json           the source checkpoint's config: labels (id2label), positions, sizes
      tokenizer.json, tokenizer_config.json, ...   the source's tokenizer, as transformers saves it

Reading one needs the standard library, ``tokenizers`` and ``onnxruntime`` only: transformers'
``AutoConfig`` and ``AutoTokenizer`` import torch (1.2 s and some 300 MB per process), so
`read_model_config` and `ExportedTokenizer` stand in for them with exactly what `TextEncoder` uses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sentiment.errors import ModelLoadError

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
FORMAT = "ray-sentiment-onnx/1"
"""The manifest's ``format``: bumped when the directory's layout or meaning changes."""


@dataclass(frozen=True)
class Manifest:
    """What an export holds and where it came from, written as ``manifest.json`` beside ``model.onnx``."""

    source: str
    """The checkpoint exported: the model id (hub id or directory) as given."""
    source_revision: str | None
    """Its hub revision, when one was asked for."""
    source_sha256: str
    """Content hash of its files (config, tokenizer, weights): which weights these are, wherever they came from."""
    dtype: str
    """'fp32', or 'int8' (weights quantized to int8, activations quantized per pass)."""
    opset: int
    onnxruntime_version: str
    """The ONNX Runtime that fused (and quantized) the graph."""
    torch_version: str
    transformers_version: str
    fused_operators: dict[str, int] = field(default_factory=dict)
    """ONNX Runtime's fused BERT operators in the graph (Attention, SkipLayerNormalization, ...)."""
    quantization: dict[str, Any] | None = None
    """int8: the settings of ``onnxruntime.quantization.quantize_dynamic``; None for fp32."""
    max_abs_logit_diff: float | None = None
    """Largest |logit difference| from torch fp32 on a probe batch, measured at export."""
    created_at: str = ""
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> Manifest:
        """The manifest in ``data``; `ModelLoadError` naming ``where`` if it is of another format or lacks a field."""
        if data.get("format") != FORMAT:
            raise ModelLoadError(f"{where} has format {data.get('format')!r}; this version reads {FORMAT!r}")
        names = {item.name for item in fields(cls)}
        required = {item.name for item in fields(cls) if item.default is MISSING and item.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ModelLoadError(f"{where} lacks {', '.join(missing)}")
        return cls(**{key: value for key, value in data.items() if key in names})


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: Path) -> Manifest:
    """The manifest of the export in ``directory``; `ModelLoadError` naming the file when it is missing or bad."""
    path = Path(directory) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(
            f"{path} is missing: {directory} holds {MODEL_FILE} but was not written by `sentiment export`"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the export manifest {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"the export manifest {path} must hold a JSON object")
    return Manifest.from_dict(data, where=str(path))


def export_directory(model_id: str) -> Path | None:
    """``model_id`` as a local directory if it is an ONNX export (it holds ``model.onnx``), else None."""
    path = Path(model_id).expanduser()
    return path.resolve() if (path / MODEL_FILE).is_file() else None


def read_model_config(directory: Path) -> Any:
    """The export's ``config.json`` with what the core reads of a transformers config (id2label, num_labels, sizes)."""
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    # JSON keys are strings; transformers turns id2label's into ints, and so does this.
    id2label = {int(key): str(value) for key, value in (data.get("id2label") or {}).items()}
    data["id2label"] = id2label or None
    data["num_labels"] = len(id2label) if id2label else int(data.get("num_labels", 2))
    return SimpleNamespace(**data)


class ExportedTokenizer:
    """The export's fast tokenizer from ``tokenizer.json``, through the ``tokenizers`` library alone.

    Offers what `sentiment.encoding.TextEncoder` uses of a transformers tokenizer: ``backend_tokenizer``,
    calling it on one text, ``pad_token_id``, ``model_max_length`` and ``split_special_tokens``. The files
    are the ones transformers saved from the source tokenizer, so the ids are the same.
    """

    is_fast = True

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        directory = Path(directory)
        try:
            self.backend_tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:
            raise ModelLoadError(f"cannot load the tokenizer {directory / 'tokenizer.json'}: {exc}") from exc
        settings_path = directory / "tokenizer_config.json"
        settings: dict[str, Any] = {}
        if settings_path.is_file():
            try:
                settings = json.loads(settings_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot read {settings_path}: {exc}") from exc
        pad = settings.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_token_id: int | None = self.backend_tokenizer.token_to_id(pad) if isinstance(pad, str) else None
        limit = settings.get("model_max_length")
        self.model_max_length: int | None = int(limit) if isinstance(limit, int | float) else None
        self.split_special_tokens = bool(settings.get("split_special_tokens", False))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}
