"""The ``digits`` preset: SD1.5's component classes at small sizes, pretrained on real handwritten digits.

Data (scoreaction.models.digits_data): scikit-learn's copy of the UCI handwritten digits, 16 px RGB,
prompts ``"a handwritten digit N"``, split into disjoint pretrain / reward / monitor / eval parts.

What is trained (``pretrain_digits``), in this order:

- VAE (AutoencoderKL, two blocks: 16 px images <-> 8x8x4 latents, scale factor 2): a few hundred steps of
  reconstruction loss with a small KL term; its ``scaling_factor`` is then set to 1 / std of the pretrain
  latents, as SD's was. Trained rather than fixed: AutoencoderKL has no identity setting, and a random one
  loses the digit.
- text encoder (CLIPTextModel, 2 layers, width 32, SD's real CLIP tokenizer and 77-token context):
  ``text_steps`` of prompt separation (``_train_text``), then frozen. A random encoder leaves the ten
  contexts different in one token of 77, which the UNet's cross-attention averages away: with it, 800 UNet
  steps drew the prompted digit in 14% of samples (chance: 10%). After separation every position after the
  digit carries it, and the UNet learns the conditioning in a few hundred steps.
- UNet (UNet2DConditionModel, cross-attention in both blocks): epsilon loss on the VAE latents under SD1.5's
  noise schedule, the prompt dropped to "" 10% of the time (classifier-free guidance). Deliberately SHORT
  (``unet_steps``), so that the base follows its prompt often but not always (``QUALITY_BAND``) and
  fine-tuning has something to show: the prompted digit's share grows with the steps (measured at the
  preset's sampler, held-out classifier, 200 samples: 62% after the default 175 steps (per digit 20% for
  5 to 95% for 6; Frechet distance 67, real digits 7, noise 690), 80% after 250 (FID 39), 88% after 450).

The result is a standard diffusers folder (safetensors) that ``StableDiffusionPipeline.from_pretrained``
loads, with the loss curves (``loss.png``) and the losses (``pretrain.json``) beside it. The preset's
folder (``digits_pipeline_dir``) is cached per seed like ``tiny``; for seed 0 it is rebuilt in seconds from
the weights shipped with the package (``digits_shipped``), since the pretraining takes minutes on a CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from scoreaction.models.digits_data import IMAGE_SIZE, PROMPTS, digit_split
from scoreaction.models.digits_plot import write_loss_curve

logger = logging.getLogger(__name__)

DIGITS_VERSION = "v2"
# The quality bar of the default pretraining: how often the held-out classifier sees the prompted digit in
# the base model's samples at the preset's sampler settings. Below: the base is not a digit model; above:
# fine-tuning has nothing left to show (a fully trained base draws the prompted digit ~99% of the time).
QUALITY_BAND: tuple[float, float] = (0.4, 0.85)
UNET_WARMUP = 20  # linear learning-rate warmup of the UNet stage, in steps

DIGITS_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)

DIGITS_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    scaling_factor=1.0,
)


def digits_text_config() -> dict:
    from scoreaction.models.presets import TINY_TEXT_CONFIG

    return dict(TINY_TEXT_CONFIG)


# --------------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------------


@dataclass
class PretrainSettings:
    """What ``pretrain_digits`` does. Defaults: the shipped ``digits`` model (3 minutes on one idle core)."""

    seed: int = 0
    vae_steps: int = 200
    unet_steps: int = 175
    batch_size: int = 32
    vae_lr: float = 2e-3
    unet_lr: float = 1e-3
    kl_weight: float = 1e-4
    cond_dropout: float = 0.1
    subset: int | None = None  # train on the first `subset` pretrain images only (tests)
    threads: int | None = 1  # torch intra-op threads while training (None: leave as is)
    text_steps: int = 200  # prompt-separation steps of the text encoder before the UNet (0: stays random)
    text_lr: float = 1e-2
    train_text_encoder: bool = False  # True: the text encoder also trains with the UNet (else frozen)


@dataclass
class PretrainResult:
    directory: Path
    settings: PretrainSettings
    vae_losses: list[float] = field(default_factory=list)
    text_losses: list[float] = field(default_factory=list)
    unet_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with n intra-op threads (None: unchanged), restoring the previous count. These models are so
    small that one thread is about as fast as two on an idle 2-core machine, and ten times faster than two
    on a loaded one (OpenMP threads spin against each other: measured 0.026 vs 0.30 s per classifier step)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _train_vae(vae, images: Tensor, s: PretrainSettings, gen: torch.Generator, progress: bool) -> list[float]:
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    losses: list[float] = []
    x_all = images * 2 - 1
    vae.train()
    with _progress(s.vae_steps, "pretrain VAE", progress) as bar:
        for _ in range(s.vae_steps):
            idx = torch.randint(0, len(x_all), (s.batch_size,), generator=gen)
            x = x_all[idx]
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            rec = vae.decode(z).sample
            kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()
            loss = F.mse_loss(rec, x) + s.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    vae.eval()
    return losses


def _train_text(text_encoder, ids: Tensor, s: PretrainSettings, progress: bool) -> list[float]:
    """Make the prompts distinguishable everywhere in the context: the position-mean hidden states of the
    ten digit prompts and "" are pushed towards mutually orthogonal directions (squared cosine similarity
    of each pair). Each of these 77-token contexts differs in one token, and a random encoder carries that
    token only at its own position, which a UNet's cross-attention, uniform at initialisation, averages
    away; after this stage every position after the digit names it."""
    params = [p for p in text_encoder.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.text_lr)
    eye = torch.eye(len(ids))
    losses: list[float] = []
    text_encoder.train()
    with _progress(s.text_steps, "pretrain text encoder", progress) as bar:
        for _ in range(s.text_steps):
            m = F.normalize(text_encoder(ids)[0].mean(dim=1), dim=-1)  # (P, D)
            loss = (m @ m.T - eye).pow(2).sum() / (len(ids) * (len(ids) - 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    text_encoder.eval()
    return losses


def _train_unet(
    unet,
    latents: Tensor,
    labels: Tensor,
    embed: Callable[[], Tensor],
    params: list[torch.nn.Parameter],
    s: PretrainSettings,
    gen: torch.Generator,
    progress: bool,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> list[float]:
    from diffusers import DDPMScheduler

    from scoreaction.models.presets import SD15_SCHEDULER_CONFIG

    sched = DDPMScheduler(
        **{k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")}
    )
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=1e-4)
    warmup = UNET_WARMUP  # fixed, so that step k of a longer run is the k-step model
    lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    losses: list[float] = []
    unet.train()
    with _progress(s.unet_steps, "pretrain UNet", progress) as bar:
        for _ in range(s.unet_steps):
            idx = torch.randint(0, len(latents), (s.batch_size,), generator=gen)
            z0 = latents[idx]
            noise = torch.randn(z0.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (s.batch_size,), generator=gen)
            zt = sched.add_noise(z0, noise, t)
            drop = torch.rand(s.batch_size, generator=gen) < s.cond_dropout
            emb = embed()  # (11, L, D): the ten prompts and ""
            c = emb[labels[idx]]
            enc = torch.where(drop[:, None, None], emb[10:11].expand_as(c), c)
            pred = unet(zt, t, encoder_hidden_states=enc).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            lr_at.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_step is not None:
                on_step(len(losses), unet)
    unet.eval()
    return losses


def build_untrained_pipeline(seed: int, tokenizer_dir: str | Path):
    """The digits pipeline at its seeded random initialisation (in memory)."""
    from scoreaction.models.presets import build_components

    return build_components(DIGITS_UNET_CONFIG, DIGITS_VAE_CONFIG, digits_text_config(), tokenizer_dir, seed)


def pretrain_digits(
    directory: str | Path,
    settings: PretrainSettings | None = None,
    progress: bool = True,
    on_unet_step: Callable[[int, torch.nn.Module], None] | None = None,
    overwrite: bool = False,
) -> PretrainResult:
    """Pretrain the digits pipeline and save it as a diffusers folder (safetensors), atomically, with
    ``pretrain.json`` (settings, losses, seconds) and ``loss.png``. Deterministic for settings.seed (on the
    same machine and torch build). The global RNG is left as it was. on_unet_step(step, unet) is called after
    every UNet step (e.g. to keep snapshots). An existing non-empty directory is an error unless overwrite,
    and is replaced only once the new model is complete."""
    s = settings or PretrainSettings()
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise FileExistsError(
            f"output directory {str(directory)!r} exists and is not empty; choose another or overwrite it "
            "(jobs/pretrain.py --force)"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    images, labels = digit_split("pretrain")
    if s.subset is not None:
        images, labels = images[: s.subset], labels[: s.subset]
    try:
        with (
            torch.random.fork_rng(devices=[]),
            torch_threads(s.threads),
            tempfile.TemporaryDirectory() as tok_dir,
        ):
            pipe = build_untrained_pipeline(s.seed, tok_dir)
            gen = torch.Generator().manual_seed(s.seed + 100)
            ids = pipe.tokenizer(
                [*PROMPTS, ""],
                padding="max_length",
                max_length=pipe.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            text_losses: list[float] = []
            if s.text_steps > 0:
                pipe.text_encoder.requires_grad_(True)
                text_losses = _train_text(pipe.text_encoder, ids, s, progress)
            pipe.text_encoder.requires_grad_(s.train_text_encoder)
            if s.train_text_encoder:
                pipe.text_encoder.train()

                def embed() -> Tensor:
                    return pipe.text_encoder(ids)[0]
            else:
                with torch.no_grad():
                    frozen = pipe.text_encoder(ids)[0]

                def embed() -> Tensor:
                    return frozen

            vae_losses = _train_vae(pipe.vae, images, s, gen, progress)
            pipe.vae.requires_grad_(False)
            with torch.no_grad():
                post = pipe.vae.encode(images * 2 - 1).latent_dist
                scale = float(1.0 / post.mean.std())
            pipe.vae.register_to_config(scaling_factor=scale)
            latents = (post.mean * scale).detach()
            params = list(pipe.unet.parameters())
            if s.train_text_encoder:
                params += list(pipe.text_encoder.parameters())
            unet_losses = _train_unet(
                pipe.unet, latents, labels, embed, params, s, gen, progress, on_unet_step
            )
            pipe.text_encoder.eval().requires_grad_(False)
            pipe.save_pretrained(tmp, safe_serialization=True)
        result = PretrainResult(
            directory, s, vae_losses, text_losses, unet_losses, time.perf_counter() - start
        )
        (tmp / "pretrain.json").write_text(
            json.dumps(
                {
                    "version": DIGITS_VERSION,
                    "settings": asdict(s),
                    "seconds": result.seconds,
                    "vae_scaling_factor": scale,
                    "vae_losses": vae_losses,
                    "text_losses": text_losses,
                    "unet_losses": unet_losses,
                },
                indent=1,
            )
        )
        write_loss_curve(vae_losses, unet_losses, tmp / "loss.png", text_losses)
        old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        if overwrite and directory.exists():
            os.rename(directory, old)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process won the race; its folder is equivalent
            if not (directory / "model_index.json").is_file():
                raise
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("pretrained digits (seed %d) in %.1f s -> %s", s.seed, result.seconds, directory)
    return result


def digits_pipeline_dir(seed: int = 0) -> Path:
    """Folder of the pretrained digits pipeline for this seed, built on first use: from the shipped weights
    when the package has them for this seed (seconds), else by pretraining (minutes)."""
    from scoreaction.models.digits_shipped import matches_defaults, materialize, shipped_weights_path
    from scoreaction.models.presets import default_cache_dir

    directory = default_cache_dir() / "models" / f"digits-{DIGITS_VERSION}-seed{seed}"
    if not (directory / "model_index.json").is_file():
        shipped = shipped_weights_path(seed)
        if shipped.is_file() and matches_defaults(shipped, seed):
            return materialize(shipped, directory)
        logger.warning(
            "pretraining the digits pipeline for seed %d into %s (first use, no shipped weights: 3-10 minutes)",
            seed,
            directory,
        )
        pretrain_digits(directory, PretrainSettings(seed=seed), overwrite=True)  # a broken cache is replaced
    return directory
