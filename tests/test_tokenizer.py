"""The offline SD tokenizer gives open_clip's ids on any text."""

from __future__ import annotations

import random

import open_clip
import pytest

from scoreaction.models.tokenizer import VOCAB_SIZE, build_clip_tokenizer, tokenize

TEXTS = [
    "a photo of a cat",
    "Hello, World!!  ",
    "café déjà vu — naïve",
    "&amp; html &lt;b&gt;",
    "ﬁ ligature Ⅻ and ＦＵＬＬ width",
    "emoji 🐱🚀 and 中文字符",
    "don't stop me now",
    "x" * 300,
    "tab\there\nnewline",
    "",
    "123.456 1,000",
    "e\u0301 vs \u00e9",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 ,.!?'\"-&;<>éüñßøç漢字カナ🙂\t\n"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def test_vocab_is_clips(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]


def test_ids_equal_open_clip(tokenizer):
    reference = open_clip.get_tokenizer("ViT-L-14")
    texts = TEXTS + _random_texts(200)
    ours = tokenize(tokenizer, texts)
    theirs = reference(texts)
    assert ours.shape == theirs.shape == (len(texts), 77)
    for text, a, b in zip(texts, ours.tolist(), theirs.tolist(), strict=True):
        n = b.index(49407) + 1  # open_clip pads with 0 after EOT, SD pads with EOT (49407)
        assert a[:n] == b[:n], text
        assert all(x == 49407 for x in a[n:]), text
