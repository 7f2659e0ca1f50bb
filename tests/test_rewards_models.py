"""Model rewards at tiny random sizes: written in the published key layout and file format, loaded back
through the real loading path (build_reward on a config), then checked against the authors' computation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms as T

from scoreaction.config.reward import RewardConfig
from scoreaction.rewards import RewardError, build_reward
from scoreaction.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess, quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import convert_reward_weights  # noqa: E402

PROMPTS = ["a photo of a cat", "a red bicycle", "ramen", "a lighthouse at dusk", "x"]
# A tiny open_clip ViT: 32 px, patch 8, 2 layers; text tower with the real 49408-token vocabulary.
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# The LAION aesthetic MLP's published keys (sac+logos+ava1-l14-linearMSE.pth): Linear layers of a Sequential
# named `layers` at indices 0, 2, 4, 6, 7 (1, 3, 5 are Dropout).
AESTHETIC_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


def _images(n: int = 5, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Seeded images already quantised to uint8 levels (so a PIL round trip is exact): (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, 3, size, size), generator=g) * 255).round() / 255


def _tiny_open_clip(seed: int):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**TINY_OPEN_CLIP).eval()


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    """A tiny open_clip model in the hub layout: open_clip_config.json + open_clip_model.safetensors."""
    from scoreaction.rewards.clip_models import write_open_clip_folder

    model = _tiny_open_clip(1)
    return write_open_clip_folder(model, TINY_OPEN_CLIP, tmp_path_factory.mktemp("open_clip"))


def _check_properties(reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Shape (B,), float32, finite, deterministic, and a batch of 5 equals 5 batches of 1 (to 1e-5)."""
    s = reward(images, prompts)
    assert s.shape == (images.shape[0],) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert torch.equal(reward(images, prompts), s)
    singles = torch.cat([reward(images[i : i + 1], prompts[i : i + 1]) for i in range(images.shape[0])])
    torch.testing.assert_close(singles, s, rtol=0, atol=1e-5)
    assert s.std() > 0  # different images score differently (a random model, not a constant)
    return s


def _pil_pipeline(size: int):
    """The authors' PIL preprocessing (CLIP / ImageReward / aesthetic): resize, crop, to tensor, normalise."""
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )


def _to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy())


@pytest.mark.parametrize("size", [32, 96])  # downscale and upscale
def test_preprocessing_is_the_authors_pil_pipeline(size):
    g = torch.Generator().manual_seed(3)
    images = torch.rand((2, 3, 48, 40), generator=g)  # not on uint8 levels: rounded as PIL would
    ours = clip_preprocess(images, size)
    theirs = torch.stack([_pil_pipeline(size)(_to_pil(x)) for x in images])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # the differentiable path (images that require grad) stays close on smooth images
    smooth = torch.nn.functional.interpolate(images[:, :, :6, :5], size=(48, 40), mode="bilinear")
    grad_path = clip_preprocess(quantize(smooth).requires_grad_(True), size).detach()
    exact = clip_preprocess(smooth, size)
    assert (grad_path - exact).abs().max() * max(OPENAI_CLIP_STD) < 1.5 / 255  # in [0, 1] units


# ---------------------------------------------------------------------------------------------- clip_score


def test_clip_score_loads_tiny_open_clip_folder(open_clip_dir):
    import open_clip

    cfg = RewardConfig(
        name="clip_score", device="cpu", batch_size=2, clip_score={"weights": str(open_clip_dir)}
    )
    reward = build_reward(cfg)
    images = _images()
    s = _check_properties(reward, images, PROMPTS)
    assert (s.abs() <= 1 + 1e-6).all()
    # the authors' computation: open_clip's forward on their preprocessing, cosine of normalised features
    model = _tiny_open_clip(1)
    pix = torch.stack([_pil_pipeline(32)(_to_pil(x)) for x in images])
    with torch.no_grad():
        img = model.encode_image(pix, normalize=True)
        txt = model.encode_text(open_clip.tokenize(PROMPTS), normalize=True)
    torch.testing.assert_close(s, (img * txt).sum(-1), rtol=0, atol=1e-5)


def test_clip_score_gradients_flow_when_images_require_grad(open_clip_dir):
    cfg = RewardConfig(name="clip_score", device="cpu", clip_score={"weights": str(open_clip_dir)})
    reward = build_reward(cfg)
    images = _images(2).requires_grad_(True)
    reward(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not reward(_images(2), PROMPTS[:2]).requires_grad


# ---------------------------------------------------------------------------------------------- aesthetic


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory, open_clip_dir):
    from scoreaction.rewards.aesthetic import AestheticMLP

    torch.manual_seed(2)
    mlp = AestheticMLP((16, 32, 8, 8, 4))  # published: (768, 1024, 128, 64, 16)
    d = tmp_path_factory.mktemp("aesthetic")
    # published as a pickled state dict: save it that way, then convert as users do
    torch.save(mlp.state_dict(), d / "sac+logos+ava1-l14-linearMSE.pth")
    assert convert_reward_weights.main(["aesthetic", str(d / "sac+logos+ava1-l14-linearMSE.pth")]) == 0
    return d, mlp


def test_aesthetic_published_keys_and_scores(aesthetic_files, open_clip_dir):
    from safetensors.torch import load_file

    d, mlp = aesthetic_files
    converted = d / "sac+logos+ava1-l14-linearMSE.safetensors"
    assert sorted(load_file(str(converted))) == sorted(AESTHETIC_KEYS)
    cfg = RewardConfig(
        name="aesthetic",
        device="cpu",
        batch_size=3,
        aesthetic={"mlp_weights": str(converted), "clip_weights": str(open_clip_dir)},
    )
    reward = build_reward(cfg)
    images = _images()
    s = _check_properties(reward, images, PROMPTS)
    # simple_inference.py: normalized(clip.encode_image(preprocess(pil))) -> MLP
    model = _tiny_open_clip(1)
    pix = torch.stack([_pil_pipeline(32)(_to_pil(x)) for x in images])
    with torch.no_grad():
        emb = model.encode_image(pix)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        expected = mlp.eval()(emb).squeeze(-1)
    torch.testing.assert_close(s, expected, rtol=0, atol=1e-5)


def test_aesthetic_refuses_pickles_and_corrupt_files(aesthetic_files, open_clip_dir, tmp_path):
    d, _ = aesthetic_files

    def build(mlp_weights):
        return build_reward(
            RewardConfig(
                name="aesthetic", aesthetic={"mlp_weights": mlp_weights, "clip_weights": str(open_clip_dir)}
            )
        )

    with pytest.raises(RewardError, match="pickle format.*convert_reward_weights.py aesthetic"):
        build(str(d / "sac+logos+ava1-l14-linearMSE.pth"))
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(
        RewardError,
        match="reward.aesthetic.mlp_weights: .*corrupt.safetensors' is not a readable safetensors file",
    ):
        build(str(bad))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(wrong))
    with pytest.raises(RewardError, match="expected key layout.*missing \\['layers.0.bias'"):
        build(str(wrong))
    with pytest.raises(RewardError, match="no such file or folder"):
        build(str(tmp_path / "missing.safetensors"))


# ---------------------------------------------------------------------------------------------- hpsv2


def test_hpsv2_checkpoint_converted_and_scored(open_clip_dir, tmp_path):
    import open_clip

    model = _tiny_open_clip(5)
    # HPS_v2.1_compressed.pt is {"state_dict": <open_clip state dict>} (hpsv2.img_score loads checkpoint['state_dict'])
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    assert convert_reward_weights.main(["hpsv2", str(tmp_path / "HPS_v2.1_compressed.pt")]) == 0
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    cfg = RewardConfig(name="hpsv2", device="cpu", batch_size=4, hpsv2={"weights": str(tmp_path)})
    reward = build_reward(cfg)
    images = _images(5, size=24, seed=1)[:, :, :, :]  # 24 px: ResizeMaxSize upsamples to 32
    images = torch.cat([images, images], dim=3)  # 24 x 48: the longest edge -> 32, padded top and bottom
    s = _check_properties(reward, images, PROMPTS)
    # hpsv2.img_score: ToTensor -> ResizeMaxSize(32) (F.resize on the tensor, zero padding) -> Normalize,
    # then model(image, text) features, logits_per_image = image_features @ text_features.T
    pre = T.Compose([T.Resize((16, 32), interpolation=T.InterpolationMode.BICUBIC)])
    pix = torch.nn.functional.pad(torch.stack([pre(x) for x in images]), (0, 0, 8, 8))
    pix = T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(pix)
    with torch.no_grad():
        out = model(pix, open_clip.tokenize(PROMPTS))
        img, txt = out[0], out[1]
    torch.testing.assert_close(s, (img @ txt.T).diagonal(), rtol=0, atol=1e-5)


def test_hpsv2_weights_missing_offline_says_where(tmp_path):
    with pytest.raises(
        RewardError, match="folder holds none of HPS_v2.safetensors, open_clip_model.safetensors"
    ):
        build_reward(RewardConfig(name="hpsv2", hpsv2={"version": "v2.0", "weights": str(tmp_path)}))


# ---------------------------------------------------------------------------------------------- pickscore


@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from scoreaction.models.tokenizer import write_clip_tokenizer_files

    torch.manual_seed(3)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    root = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(root / "model", safe_serialization=True)
    write_clip_tokenizer_files(root / "processor")
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_convert_rgb=True
    ).save_pretrained(root / "processor")
    return root, model


def test_pickscore_scores_equal_clipmodel_logits(pickscore_dirs):
    from transformers import CLIPImageProcessor, CLIPTokenizer

    root, model = pickscore_dirs
    cfg = RewardConfig(
        name="pickscore",
        device="cpu",
        batch_size=2,
        pickscore={"model": str(root / "model"), "processor": str(root / "processor")},
    )
    reward = build_reward(cfg)
    images = _images()
    s = _check_properties(reward, images, PROMPTS)
    # the PickScore README: processor(images), processor(text, padding, truncation, max_length=77), then
    # logit_scale.exp() * text_embs @ image_embs.T; per (image, its prompt) = the diagonal of logits_per_image
    proc = CLIPImageProcessor.from_pretrained(root / "processor")
    tok = CLIPTokenizer.from_pretrained(root / "processor")
    pix = proc(images=[_to_pil(x) for x in images], return_tensors="pt")["pixel_values"]
    text = tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pix)
    torch.testing.assert_close(s, logits.logits_per_image.diagonal(), rtol=0, atol=1e-4)


def test_pickscore_refuses_a_pickle_only_folder(pickscore_dirs, tmp_path):
    root, model = pickscore_dirs
    (tmp_path / "config.json").write_text((root / "model" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    cfg = RewardConfig(
        name="pickscore", pickscore={"model": str(tmp_path), "processor": str(root / "processor")}
    )
    with pytest.raises(
        RewardError, match="holds only pickle weights.*convert_reward_weights.py transformers"
    ):
        build_reward(cfg)
    # converted once, it loads and scores like the original folder
    assert convert_reward_weights.main(["transformers", str(tmp_path)]) == 0
    (tmp_path / "pytorch_model.bin").unlink()
    images = _images(2)
    ref = build_reward(
        cfg.model_copy(update={"pickscore": cfg.pickscore.model_copy(update={"model": str(root / "model")})})
    )
    torch.testing.assert_close(
        build_reward(cfg)(images, PROMPTS[:2]), ref(images, PROMPTS[:2]), rtol=0, atol=0
    )
