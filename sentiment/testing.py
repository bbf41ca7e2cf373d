"""Random-weight checkpoints for tests and benchmarks, built locally with no network.

They load through the same ``from_pretrained`` path as a real model: a WordPiece vocab written
here, a ``BertForSequenceClassification`` with random weights, both saved with
``save_pretrained``. Their predictions mean nothing; their shapes and speed are real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Common English words; the synthetic corpus (benchmarks/corpus.py) writes reviews from them, so
# in the vocab below each is exactly one WordPiece token.
WORDS: tuple[str, ...] = tuple(
    """
    the a an and or but if of to in on at by for with from as is was are were be been being this that
    these those it its he she they we you I his her their our your film movie story plot acting actor
    actress director scene scenes script music score camera character characters ending beginning
    good great bad terrible awful wonderful brilliant boring dull funny sad beautiful ugly best worst
    love loved hate hated like liked enjoyed watch watched watching see saw seen time times year years
    first last long short really very quite too much many more most some any all no not never ever
    again still just only also even well so then than when while after before because although though
    performance performances role cast screen series episode season drama comedy horror action thriller
    romance classic original remake sequel budget effects dialogue writing cinematography editing pace
    minutes hours end start people man woman men women family friend friends life world way thing things
    make made makes making give gave think thought feel felt know knew say said look looked find found
    recommend waste money worth fun amazing perfect poor weak strong excellent fantastic horrible
    """.split()
)

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_PUNCTUATION = list(".,!?;:'\"()-/&%$#@*+=<>[]{}_~`|\\^")
_CJK = list("电影很好看不喜欢映画素晴らしい")

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}


def vocab() -> list[str]:
    """A cased WordPiece vocab: specials, punctuation, characters (whole and ``##``), the words."""
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    characters += [c.upper() for c in characters] + [str(d) for d in range(10)]
    tokens = _SPECIALS + _PUNCTUATION + characters + [f"##{c}" for c in characters] + _CJK
    seen = set(tokens)
    for word in WORDS:
        for form in (word, word.capitalize()):
            if form not in seen:
                seen.add(form)
                tokens.append(form)
    return tokens


def make_checkpoint(
    path: str | Path,
    *,
    size: str = "tiny",
    num_labels: int = 2,
    id2label: dict[int, str] | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    safe_serialization: bool = True,
) -> Path:
    """Write a random-weight BERT sequence classifier and its tokenizer to ``path``.

    ``initializer_range`` is wider than BERT's 0.02 so that random logits are far apart and labels
    are not decided by rounding noise in tests that compare labels.
    """
    import torch

    # transformers 5: BertTokenizer is the fast (tokenizers-backed) one.
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokens = vocab()
    tokenizer = BertTokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
        do_lower_case=False,
        model_max_length=max_position_embeddings,
    )
    tokenizer.save_pretrained(path)

    id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    options: dict[str, Any] = {
        "vocab_size": len(tokens),
        "max_position_embeddings": max_position_embeddings,
        "num_labels": num_labels,
        "id2label": id2label,
        "label2id": {name: index for index, name in id2label.items()},
        "initializer_range": 0.2 if size == "tiny" else 0.02,
        **SIZES[size],
    }
    config = BertConfig(**options)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    if safe_serialization:
        model.save_pretrained(path)
    else:
        # Old-style checkpoint with only pytorch_model.bin, as some hub models still ship.
        config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def describe_size(size: str) -> dict[str, Any]:
    """The architecture numbers of a size name, for benchmark reports."""
    return dict(SIZES[size])


# -- a labelled synthetic corpus ---------------------------------------------------------------------
# Random weights make label agreement between engines meaningless (their classes sit a rounding apart),
# so fidelity is measured on a small BERT trained on reviews whose label follows from the text: which
# of the positive or the negative words are more frequent. Every word is one token in `vocab`.

POSITIVE_WORDS: tuple[str, ...] = tuple(
    "good great wonderful brilliant funny beautiful best love loved liked enjoyed recommend fun amazing perfect "
    "excellent fantastic strong worth".split()
)
NEGATIVE_WORDS: tuple[str, ...] = tuple(
    "bad terrible awful boring dull ugly worst hate hated waste poor weak horrible sad".split()
)
NEUTRAL_WORDS: tuple[str, ...] = tuple(
    word for word in WORDS if word not in POSITIVE_WORDS and word not in NEGATIVE_WORDS and word != "like"
)


def labelled_reviews(
    count: int, *, seed: int, min_words: int = 20, max_words: int = 100, most_sentiment_words: int = 6
) -> tuple[list[str], list[int]]:
    """``count`` reviews and their labels (1: positive words outnumber negative ones, 0: the reverse; never a tie).

    Each review is neutral filler with 0 to ``most_sentiment_words`` words of each polarity mixed in.
    """
    import random

    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[int] = []
    for _ in range(count):
        positive = rng.randint(0, most_sentiment_words)
        negative = rng.choice([n for n in range(most_sentiment_words + 1) if n != positive])
        length = max(rng.randint(min_words, max_words), positive + negative)
        words = [rng.choice(NEUTRAL_WORDS) for _ in range(length - positive - negative)]
        words += [rng.choice(POSITIVE_WORDS) for _ in range(positive)]
        words += [rng.choice(NEGATIVE_WORDS) for _ in range(negative)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(int(positive > negative))
    return texts, labels
