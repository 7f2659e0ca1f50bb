"""Shared fixtures: offline, CPU, tiny seeded models written by the tests themselves."""

from __future__ import annotations

import os
import tempfile

# Before any Hugging Face import: nothing may be downloaded.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny pipeline is written into a per-session cache, so every run exercises the write + load path.
_CACHE = tempfile.mkdtemp(prefix="scoreaction-test-cache-")
os.environ["SCOREACTION_CACHE"] = _CACHE

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_dir():
    from scoreaction.models import tiny_pipeline_dir

    return tiny_pipeline_dir(seed=0)


@pytest.fixture(scope="module")
def tiny_policy(tiny_dir):
    """A LoRA policy on the tiny preset. Tests must not change its weights (use fresh_policy for that)."""
    from scoreaction.config import ModelConfig
    from scoreaction.policy import DiffusionPolicy

    return DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))


@pytest.fixture
def fresh_policy(tiny_dir):
    from scoreaction.config import ModelConfig
    from scoreaction.policy import DiffusionPolicy

    return DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))


def randomize_lora(policy, seed: int = 1, scale: float = 0.3) -> None:
    """Give the (zero-initialised) LoRA up-projections random values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
