"""ImageReward: a tiny BLIP checkpoint in the published key layout (ImageReward.pt, a pickled state dict),
converted to safetensors as users do, loaded through build_reward, checked against closed forms."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from scoreaction.config.reward import RewardConfig
from scoreaction.rewards import RewardError, build_reward
from scoreaction.rewards.imagereward import REWARD_MEAN, REWARD_STD

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import convert_reward_weights  # noqa: E402

VISION_WIDTH, DEPTH, PATCH, GRID = 64, 2, 8, 2  # published: 1024, 24, 16, 14 (224 px)
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
WORDS = ["a", "photo", "of", "cat", "dog", "red", "bicycle", "ramen", "lighthouse", "at", "dusk"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
PROMPTS = ["a photo of a cat", "a red bicycle", "ramen", "a lighthouse at dusk", "dog"]


def published_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under ImageReward.pt's key names (ImageReward/models/BLIP/vit.py, med.py; MLP)."""
    g = torch.Generator().manual_seed(seed)
    d, h, n_text = VISION_WIDTH, TEXT["hidden_size"], TEXT["num_hidden_layers"]

    def r(*shape, scale=0.2):
        return torch.randn(shape, generator=g) * scale

    def ln(prefix, dim):
        return {f"{prefix}.weight": 1 + r(dim, scale=0.05), f"{prefix}.bias": r(dim, scale=0.05)}

    def lin(prefix, out, inp):
        return {f"{prefix}.weight": r(out, inp), f"{prefix}.bias": r(out, scale=0.05)}

    v = "blip.visual_encoder"
    s = {f"{v}.cls_token": r(1, 1, d), f"{v}.pos_embed": r(1, GRID * GRID + 1, d)}
    s |= {
        f"{v}.patch_embed.proj.weight": r(d, 3, PATCH, PATCH, scale=0.05),
        f"{v}.patch_embed.proj.bias": r(d),
    }
    for i in range(DEPTH):
        b = f"{v}.blocks.{i}"
        s |= ln(f"{b}.norm1", d) | lin(f"{b}.attn.qkv", 3 * d, d) | lin(f"{b}.attn.proj", d, d)
        s |= ln(f"{b}.norm2", d) | lin(f"{b}.mlp.fc1", 4 * d, d) | lin(f"{b}.mlp.fc2", d, 4 * d)
    s |= ln(f"{v}.norm", d)
    t = "blip.text_encoder"
    vocab = len(VOCAB) + 2  # + [DEC], [ENC]
    s |= {
        f"{t}.embeddings.word_embeddings.weight": r(vocab, h),
        f"{t}.embeddings.position_embeddings.weight": r(40, h),
    }
    s |= ln(f"{t}.embeddings.LayerNorm", h)
    s[f"{t}.embeddings.position_ids"] = torch.arange(40).unsqueeze(0)  # a persistent buffer in BLIP's med.py
    for i in range(n_text):
        b = f"{t}.encoder.layer.{i}"
        for att, kv_in in (("attention", h), ("crossattention", d)):
            s |= lin(f"{b}.{att}.self.query", h, h) | lin(f"{b}.{att}.self.key", h, kv_in)
            s |= lin(f"{b}.{att}.self.value", h, kv_in) | lin(f"{b}.{att}.output.dense", h, h)
            s |= ln(f"{b}.{att}.output.LayerNorm", h)
        s |= lin(f"{b}.intermediate.dense", TEXT["intermediate_size"], h)
        s |= lin(f"{b}.output.dense", h, TEXT["intermediate_size"]) | ln(f"{b}.output.LayerNorm", h)
    s |= lin("blip.vision_proj", 16, d) | lin("blip.text_proj", 16, h)  # in the file, unused by the score
    for i, (o, n) in zip((0, 2, 4, 6, 7), ((16, h), (8, 16), (8, 8), (4, 8), (1, 4)), strict=True):
        s |= lin(f"mlp.layers.{i}", o, n)
    return s


def write_published(root: Path, state: dict[str, torch.Tensor]) -> Path:
    """ImageReward.pt + med_config.json + a BERT vocab.txt, then the one-off conversion."""
    root.mkdir(parents=True, exist_ok=True)
    torch.save(state, root / "ImageReward.pt")
    med = {"vocab_size": len(VOCAB) + 2, "max_position_embeddings": 40, "layer_norm_eps": 1e-12, **TEXT}
    med |= {"encoder_width": 768, "add_cross_attention": True, "hidden_act": "gelu"}
    (root / "med_config.json").write_text(json.dumps(med))
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    assert convert_reward_weights.main(["imagereward", str(root / "ImageReward.pt")]) == 0
    return root


def _cfg(root: Path, **kw) -> RewardConfig:
    return RewardConfig(
        name="imagereward",
        device="cpu",
        imagereward={"weights": str(root), "tokenizer": str(root / "tokenizer")},
        **kw,
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return write_published(tmp_path_factory.mktemp("imagereward"), published_state())


def test_imagereward_loads_published_layout_and_is_batch_invariant(published):
    reward = build_reward(_cfg(published, batch_size=2))
    images = torch.rand((5, 3, 24, 20), generator=torch.Generator().manual_seed(0))
    s = reward(images, PROMPTS)
    assert s.shape == (5,) and s.dtype == torch.float32 and torch.isfinite(s).all() and s.std() > 0
    assert torch.equal(reward(images, PROMPTS), s)
    singles = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(singles, s, rtol=0, atol=1e-5)
    # the prompt matters (cross-attention text tower), and so does the image
    assert not torch.equal(reward(images[:1], ["dog"]), reward(images[:1], ["a red bicycle"]))
    assert not torch.equal(reward(images[:1], ["dog"]), reward(images[1:2], ["dog"]))


def test_imagereward_normalisation_closed_form(tmp_path):
    # last MLP layer zero with bias b: every score is (b - 0.16717362830052426) / 1.0333394966054072
    state = published_state(seed=1)
    state["mlp.layers.7.weight"] = torch.zeros(1, 4)
    state["mlp.layers.7.bias"] = torch.tensor([2.5])
    reward = build_reward(_cfg(write_published(tmp_path / "ir", state)))
    s = reward(torch.rand((3, 3, 16, 16), generator=torch.Generator().manual_seed(1)), PROMPTS[:3])
    torch.testing.assert_close(s, torch.full((3,), (2.5 - REWARD_MEAN) / REWARD_STD), rtol=0, atol=1e-6)


def test_imagereward_bad_files(published, tmp_path):
    with pytest.raises(RewardError, match="pickle format.*convert_reward_weights.py imagereward"):
        build_reward(
            RewardConfig(name="imagereward", imagereward={"weights": str(published / "ImageReward.pt")})
        )
    with pytest.raises(RewardError, match="reward.imagereward.weights is not set"):
        build_reward(RewardConfig(name="imagereward"))
    (tmp_path / "ImageReward.safetensors").write_bytes(
        (published / "ImageReward.safetensors").read_bytes()[:1000]
    )
    with pytest.raises(RewardError, match="med_config.json.*is missing"):
        build_reward(_cfg(tmp_path))
    (tmp_path / "med_config.json").write_text((published / "med_config.json").read_text())
    with pytest.raises(RewardError, match="not a readable safetensors file"):
        build_reward(_cfg(tmp_path))
