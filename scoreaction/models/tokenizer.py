"""The SD / CLIP BPE tokenizer, rebuilt offline from the vocabulary that open_clip_torch ships.

SD1.x uses OpenAI CLIP's BPE (vocab 49408: 256 byte tokens, their ``</w>`` forms, 48894 merges, and
``<|startoftext|>`` / ``<|endoftext|>``). open_clip ships the same BPE file
(``open_clip/bpe_simple_vocab_16e6.txt.gz``); we turn it into the ``vocab.json`` + ``merges.txt`` pair
that ``transformers.CLIPTokenizer`` reads, so no hub download is needed.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # as in open_clip.tokenizer.SimpleTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    # Copied from open_clip.tokenizer.bytes_to_unicode (itself from OpenAI CLIP)
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def open_clip_bpe_path() -> Path:
    """The BPE merges file inside the installed open_clip_torch package."""
    import open_clip.tokenizer

    path = Path(open_clip.tokenizer.default_bpe())
    if not path.is_file():
        raise FileNotFoundError(f"open_clip_torch's BPE file is missing at {path}; reinstall open_clip_torch")
    return path


def write_clip_tokenizer_files(directory: str | os.PathLike) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs for SD's CLIP tokenizer into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = byte_tokens + [v + "</w>" for v in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    (directory / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)
    )
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def build_clip_tokenizer(directory: str | os.PathLike) -> CLIPTokenizer:
    """Write the tokenizer files into directory and load them back as a transformers CLIPTokenizer."""
    write_clip_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(str(directory))


def clean_prompt(text: str) -> str:
    """Normalise a prompt exactly as OpenAI CLIP / open_clip do before BPE: ftfy.fix_text, HTML unescape,
    whitespace folding, lower case. The tokenizers-backed ``CLIPTokenizer`` only folds whitespace and case,
    so without this step text such as ``&amp;`` or the ligature ``ﬁ`` would tokenize differently."""
    from open_clip.tokenizer import basic_clean, whitespace_clean

    return whitespace_clean(basic_clean(text)).lower()


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], max_length: int = MODEL_MAX_LENGTH):
    """Clean and tokenize prompts to fixed-length ids, (B, max_length) int64, padded as SD pads."""
    return tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
