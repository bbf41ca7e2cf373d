"""`benchmarks.run`'s arithmetic: forward FLOPs for MFU, the table's ratios."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

from benchmarks.run import Row, forward_flops, render


def bert_large_on_meta() -> BertForSequenceClassification:
    config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    # Shapes only, no memory: the FLOP count needs parameter sizes, not values.
    with torch.device("meta"):
        return BertForSequenceClassification(config)


def test_forward_flops_count_every_matrix_weight_twice_per_token_plus_attention() -> None:
    model = bert_large_on_meta()
    layers, hidden = 24, 1024
    # One token: 2 FLOPs per non-embedding weight (about 303M of BERT-large's 335M) and a 1 x 1 attention.
    weights = (forward_flops(model, [1]) - 4 * layers * hidden) / 2
    assert 302e6 < weights < 305e6
    # 512 tokens: 512 times the weights' work plus the two 512 x 512 attention products per layer.
    assert forward_flops(model, [512]) == 2 * weights * 512 + 4 * layers * hidden * 512 * 512
    # Windows add up; padding is not counted.
    assert forward_flops(model, [100, 412]) == forward_flops(model, [100]) + forward_flops(model, [412])


def test_table_gives_ratios_to_ceiling_and_baseline_and_mfu_on_tensor_core_rows() -> None:
    rows = [
        Row("ceiling", "model forward only", "bf16", "budget 16384", seconds=1.0, texts=10, tokens=1000),
        Row("offline", "ours", "bf16", "1 actor", seconds=2.0, texts=10, tokens=1000),
        Row("offline", "baseline", "fp32", "-", seconds=4.0, texts=10, tokens=1000),
    ]
    for row in rows:
        row.ceiling_seconds_per_token = 1.0 / 1000
        row.baseline_seconds_per_token = 4.0 / 1000
    # 1e9 FLOPs per token against a 1 TFLOP/s peak: 1000 tokens/s is 100% MFU.
    lines = render(rows, flops_per_token=1e9, peak_tflops=1.0).splitlines()
    assert lines[0].endswith("| labels | MFU |")
    assert lines[2].split("|")[7:9] == [" 100% ", " 4.00x "]
    assert lines[2].endswith(" 100.0% |")
    assert lines[3].split("|")[7:9] == [" 50% ", " 2.00x "]
    assert lines[3].endswith(" 50.0% |")
    assert lines[4].endswith(" - |")  # fp32 does not run on the bf16 tensor-core peak
    assert "MFU" not in render(rows)
