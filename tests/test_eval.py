"""The evaluation report, checked against plain counting done here, independently of the code under test."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.args import PipelineArgs
from pipelines.eval import evaluate, report_from_counts
from ray_sentiment.cli import main
from sentiment.config import ModelConfig
from sentiment.errors import InvalidInputError
from sentiment.model import SentimentClassifier
from sentiment.testing import write_corpus

GOLD = ["neg"] * 7 + ["pos"] * 9 + [None, "pos", "neg"]
PREDICTED = ["neg", "neg", "neg", "neg", "pos", "pos", "neg"] + ["pos"] * 6 + ["neg"] * 3 + ["pos", None, None]


def plain_report(gold: list[Any], predicted: list[Any]) -> dict[str, Any]:
    """Precision, recall and F1 by direct counting over row pairs."""
    pairs = [(g, p) for g, p in zip(gold, predicted, strict=True) if g is not None and p is not None]
    counts = Counter(pairs)
    out: dict[str, Any] = {}
    for label in ("neg", "pos"):
        tp = counts[(label, label)]
        predicted_as = sum(n for (_, p), n in counts.items() if p == label)
        actual = sum(n for (g, _), n in counts.items() if g == label)
        # An empty denominator scores 0 (scikit-learn's zero_division default).
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / actual if actual else 0.0
        out[label] = {
            "precision": precision,
            "recall": recall,
            "f1-score": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "support": actual,
        }
    total = len(pairs)
    out["accuracy"] = sum(n for (g, p), n in counts.items() if g == p) / total
    shares = (out["neg"]["support"] / total, out["pos"]["support"] / total)
    for name, weights in (("macro avg", (0.5, 0.5)), ("weighted avg", shares)):
        out[name] = {
            key: weights[0] * out["neg"][key] + weights[1] * out["pos"][key]
            for key in ("precision", "recall", "f1-score")
        }
        out[name]["support"] = total
    out["confusion"] = [[counts[(g, p)] for p in ("neg", "pos")] for g in ("neg", "pos")]
    return out


def scored_table(gold: list[Any], predicted: list[Any], gold_column: str = "input_label") -> pa.Table:
    """A table shaped like `sentiment batch` output."""
    n = len(gold)
    return pa.table(
        {
            "id": list(range(n)),
            gold_column: gold,
            "label": pa.array(predicted, pa.string()),
            "score": [None if p is None else 0.9 for p in predicted],
            "score_neg": [None if p is None else (0.9 if p == "neg" else 0.1) for p in predicted],
            "score_pos": [None if p is None else (0.1 if p == "neg" else 0.9) for p in predicted],
            "num_tokens": pa.array([None if p is None else 12 for p in predicted], pa.int64()),
            "truncated": pa.array([None if p is None else False for p in predicted], pa.bool_()),
            "error": [None if p is not None else "text is empty" for p in predicted],
        }
    )


def assert_matches(report: dict[str, Any], expected: dict[str, Any]) -> None:
    for label in ("neg", "pos"):
        assert report["classes"][label] == pytest.approx(expected[label])
    for name in ("macro avg", "weighted avg"):
        assert report[name] == pytest.approx(expected[name])
    assert report["accuracy"] == pytest.approx(expected["accuracy"])
    assert report["confusion_matrix"] == expected["confusion"]


def test_report_of_scored_output_equals_plain_counting(tmp_path: Path) -> None:
    out = tmp_path / "scored"
    out.mkdir()
    table = scored_table(GOLD, PREDICTED)
    pq.write_table(table.slice(0, 10), out / "part-00000-a-0000.parquet")
    pq.write_table(table.slice(10), out / "part-00001-b-0000.parquet")
    (out / "_SUCCESS").write_text("{}\n")
    report = evaluate(str(out)).to_dict()
    expected = plain_report(GOLD, PREDICTED)
    assert_matches(report, expected)
    # Confusion: neg row 5 right + 2 wrong; pos row 6 right + 3 wrong. Two errors, one without gold.
    assert expected["confusion"] == [[5, 2], [3, 6]]
    assert report["rows"] == {"total": 19, "evaluated": 16, "errors": 2, "missing_gold": 1}


def test_gold_labels_as_class_indices(tmp_path: Path) -> None:
    indices = [None if g is None else ("neg", "pos").index(g) for g in GOLD]
    path = tmp_path / "scored.parquet"
    pq.write_table(scored_table(indices, PREDICTED, gold_column="sentiment"), path)
    report = evaluate(str(path), label_column="sentiment").to_dict()
    assert_matches(report, plain_report(GOLD, PREDICTED))


def test_unknown_gold_label_is_named(tmp_path: Path) -> None:
    path = tmp_path / "scored.parquet"
    pq.write_table(scored_table(["neg", "neutral"], ["neg", "pos"]), path)
    with pytest.raises(InvalidInputError, match="gold label 'neutral' in column 'label' is not one of"):
        evaluate(str(path))
    pq.write_table(scored_table([0, 2], ["neg", "pos"]), path)
    with pytest.raises(InvalidInputError, match=r"gold label 2 in column 'label' is not a class index 0\.\.1"):
        evaluate(str(path))


def test_text_layout_follows_the_model_card() -> None:
    report = report_from_counts(["neg", "pos"], [[3, 1], [1, 3]], error_rows=1)
    assert report.format_text() == "\n".join(
        [
            "              precision    recall  f1-score   support",
            "",
            "         neg       0.75      0.75      0.75         4",
            "         pos       0.75      0.75      0.75         4",
            "",
            "    accuracy                           0.75         8",
            "   macro avg       0.75      0.75      0.75         8",
            "weighted avg       0.75      0.75      0.75         8",
            "",
            "confusion matrix (rows: gold, columns: predicted)",
            "gold    neg    pos",
            "neg       3      1",
            "pos       1      3",
            "",
            "8 of 9 rows evaluated; 1 without a prediction (text errors), 0 without a gold label",
        ]
    )


def test_a_class_never_predicted_scores_zero_precision() -> None:
    report = report_from_counts(["neg", "pos"], [[4, 0], [2, 0]]).to_dict()
    assert report["classes"]["pos"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 2}
    assert report["classes"]["neg"]["precision"] == pytest.approx(4 / 6)


def test_eval_command_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "scored.parquet"
    pq.write_table(scored_table(GOLD, PREDICTED), path)
    assert main(["eval", str(path), "--json"]) == 0
    assert_matches(json.loads(capsys.readouterr().out), plain_report(GOLD, PREDICTED))
    assert main(["eval", str(path)]) == 0
    assert "weighted avg" in capsys.readouterr().out


def test_eval_of_a_missing_gold_column_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"text": ["a film"]}), path)
    assert main(["eval", str(path), "--label-column", "stars"]) == 1
    assert "has no gold label column 'stars'" in capsys.readouterr().err


def test_unscored_input_is_scored_first(
    ray_session: Any, tmp_path: Path, tiny_checkpoint: Path, classifier: SentimentClassifier
) -> None:
    paths = write_corpus(tmp_path / "corpus", rows=60, files=2, seed=11)
    table = pa.concat_tables([pq.read_table(path) for path in paths])
    # num_gpus auto on the shared Ray's logical GPU: GPU actors, which run on the CPU only when told so.
    model = ModelConfig(model_id=str(tiny_checkpoint), dtype="fp32", gpu_fallback="cpu")
    pipeline = PipelineArgs(model=model, input="unused", output="unused")
    report = evaluate(str(tmp_path / "corpus"), pipeline=pipeline).to_dict()
    predicted = [p.label for p in classifier.predict(table.column("text").to_pylist())]
    expected = plain_report(table.column("label").to_pylist(), predicted)
    assert report["classes"]["neg"]["support"] + report["classes"]["pos"]["support"] == 60
    assert_matches(report, expected)
