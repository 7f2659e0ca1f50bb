"""Model presets and loading (see presets.py) and the offline CLIP tokenizer (see tokenizer.py)."""

from scoreaction.models.presets import from_pretrained, load_pipeline, tiny_pipeline_dir, write_tiny_pipeline
from scoreaction.models.tokenizer import build_clip_tokenizer, clean_prompt, tokenize

__all__ = [
    "build_clip_tokenizer",
    "clean_prompt",
    "from_pretrained",
    "load_pipeline",
    "tiny_pipeline_dir",
    "tokenize",
    "write_tiny_pipeline",
]
