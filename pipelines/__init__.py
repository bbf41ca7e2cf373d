"""Batch scoring on Ray Data: ``sentiment batch`` over Parquet (`pipelines.batch.run`), and `score` for any Dataset.

``pipelines.score(ds, model, text_column=...)`` appends the prediction columns to a user's own Ray
Dataset (see `pipelines.scoring`). Importing this package imports neither ray nor torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["score"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import pipelines` stays light for the CLI; `score` itself imports Ray Data's stages.
    if name == "score":
        from pipelines.scoring import score

        return score
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
