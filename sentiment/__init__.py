"""A BERT sentiment classifier that serves HTTP on Ray Serve and scores Parquet corpora on Ray Data.

This package is the shared core; it never imports ray (nor torch) at import time.
"""

from __future__ import annotations

from sentiment.config import DEFAULT_MODEL_ID, ModelConfig
from sentiment.errors import InvalidInputError, ModelLoadError, SentimentError
from sentiment.model import EncodedText, Prediction, SentimentClassifier

__all__ = [
    "DEFAULT_MODEL_ID",
    "EncodedText",
    "InvalidInputError",
    "ModelConfig",
    "ModelLoadError",
    "Prediction",
    "SentimentClassifier",
    "SentimentError",
]
