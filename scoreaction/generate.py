"""Image generation for serving: one base model, checkpoints as extra adapters on it, deterministic batches.

``ImageGenerator`` holds one ``DiffusionPolicy`` (the base model). A LoRA checkpoint is loaded as one more
named peft adapter on the same UNet (a few MB each, so an LRU of several costs almost nothing); a full
fine-tune checkpoint as its own UNet. ``generate`` samples with the training sampler's math
(``policy.time_grid``, ``policy.predict_eps``, ``step_mean_std``: DDIM with the request's eta) but records no
latents, log-probs or reference values.

Determinism. A request's noise comes from its own ``torch.Generator(seed)`` in the order
``sample_trajectories`` draws it (initial latents, then one draw per step), so a lone request equals
``sample_trajectories(policy, [prompt] * n, sampler, Generator().manual_seed(seed))``. CPU (and GPU) kernels
pick their blocking by batch shape, so a sample's float32 result depends on how many rows share its UNet call
(measured on ``tiny``: odd batch sizes move epsilon by ~4e-6), though not on its position or its neighbours.
So every network call here (text encoder, UNet, VAE) runs on exactly ``chunk`` samples, padding the last
chunk: an image's bytes then depend only on its seed, its parameters, the model and ``chunk``, never on which
other requests were batched with it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from scoreaction.checkpoint import CheckpointError, load_lora_state, read_metadata
from scoreaction.config import ModelConfig
from scoreaction.policy import DiffusionPolicy
from scoreaction.sde import step_mean_std

logger = logging.getLogger(__name__)


class InvalidRequestError(ValueError):
    """Parameters the API bounds allow but this model cannot take (HTTP 422)."""

    status_code = 422


@dataclass(frozen=True)
class GenerationSpec:
    """One request. Requests in one ``generate`` call share height, width, steps, guidance and eta."""

    prompt: str
    seed: int
    n: int = 1
    negative_prompt: str = ""
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    eta: float = 1.0
    height: int | None = None
    width: int | None = None

    def batch_key(self) -> tuple:
        """Requests with equal keys can share UNet calls."""
        return (self.height, self.width, self.num_inference_steps, self.guidance_scale, self.eta)


@dataclass
class LoadedModel:
    """A model a replica holds: the base (adapter None, unet None), a LoRA adapter, or a full UNet."""

    key: str
    adapter: str | None = None
    unet: torch.nn.Module | None = None
    _owner: ImageGenerator | None = None

    def unload(self) -> None:
        """Free the adapter or UNet (idempotent). Serve's multiplexer calls __del__ on LRU eviction."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.unload(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.unload()


def images_to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, rounded as torchvision's save_image does."""
    return images.mul(255).add_(0.5).clamp_(0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8)


def encode_png(image_hwc: Tensor) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (no timestamps or text chunks: the same pixels give the same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(image_hwc.numpy(), mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


class ImageGenerator:
    """The base model of one replica plus the checkpoints loaded on it. Thread-safe: one lock guards the UNet
    (adapter set, active adapter) across loading and generation."""

    def __init__(self, policy: DiffusionPolicy, chunk: int = 4) -> None:
        if chunk < 1:
            raise ValueError(f"chunk={chunk} must be >= 1")
        self.policy = policy
        self.chunk = chunk
        self._lock = threading.Lock()
        self._count = 0

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, chunk: int = 4) -> ImageGenerator:
        return cls(DiffusionPolicy.from_config(model_cfg), chunk)

    @property
    def default_size(self) -> int:
        return self.policy.unet.config.sample_size * self.policy.vae_scale_factor

    # ----------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------

    def load(self, key: str, path: str | None) -> LoadedModel:
        """Load a checkpoint folder (safetensors only; pickles refused) or, with path None, the base model."""
        if path is None:
            return LoadedModel(key=key)
        meta = read_metadata(path)  # refuses pickle-only folders, checks kind
        if meta.get("base_model") not in (None, self.policy.base_model):
            logger.warning(
                "checkpoint %s was trained on base_model=%r; this replica serves %r",
                path,
                meta.get("base_model"),
                self.policy.base_model,
            )
        if meta["kind"] == "lora":
            return self._load_lora(key, Path(path), meta)
        if meta["kind"] == "full":
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(Path(path) / "unet", use_safetensors=True)
            unet.requires_grad_(False).eval().to(self.policy.device, self.policy.dtype)
            return LoadedModel(key=key, unet=unet, _owner=self)
        raise CheckpointError(
            f"checkpoint {path!r} is a {meta['kind']!r} checkpoint; only lora and full serve"
        )

    def _load_lora(self, key: str, path: Path, meta: dict) -> LoadedModel:
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        lora = meta.get("lora") or {}
        policy_cfg = (meta.get("config") or {}).get("policy", {})
        rank = lora.get("rank") or policy_cfg.get("lora_rank") or self.policy.cfg.lora_rank
        state = load_lora_state(path)
        with self._lock:
            self._count += 1
            name = f"served_{self._count}"  # peft adapter names become module keys: no '.' or '@'
            unet = self.policy.unet
            with warnings.catch_warnings():  # "Already found a `peft_config`": many adapters, intended
                warnings.simplefilter("ignore", UserWarning)
                unet.add_adapter(
                    LoraConfig(
                        r=rank,
                        lora_alpha=lora.get("alpha") or policy_cfg.get("lora_alpha") or rank,
                        target_modules=lora.get("target_modules")
                        or list(self.policy.cfg.lora_target_modules),
                    ),
                    adapter_name=name,
                )
            try:
                result = set_peft_model_state_dict(unet, state, adapter_name=name)
                if getattr(result, "unexpected_keys", None):
                    raise CheckpointError(
                        f"checkpoint {str(path)!r} has LoRA keys this model lacks: {result.unexpected_keys[:3]}"
                    )
            except Exception:
                unet.delete_adapters(name)
                raise
            unet.to(self.policy.device)
        logger.info("loaded checkpoint %s as adapter %s", path, name)
        return LoadedModel(key=key, adapter=name, _owner=self)

    def unload(self, model: LoadedModel) -> None:
        with self._lock:
            if model.adapter is not None:
                with warnings.catch_warnings():  # "adapter ... was active which is now deleted": intended
                    warnings.simplefilter("ignore", UserWarning)
                    self.policy.unet.delete_adapters(model.adapter)
                logger.info("unloaded adapter %s (%s)", model.adapter, model.key)
            model.unet = None

    @contextlib.contextmanager
    def _active(self, model: LoadedModel) -> Iterator[None]:
        """Within this context the policy predicts with the given model (caller holds the lock)."""
        policy = self.policy
        if model.unet is not None:
            live, policy.unet = policy.unet, model.unet
            try:
                yield
            finally:
                policy.unet = live
        elif model.adapter is None:
            with policy.reference():  # the base model: every adapter disabled
                yield
        else:
            policy.unet.set_adapter(model.adapter)
            policy.unet.enable_adapters()
            yield

    # ----------------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------------

    def _chunked(self, fn: Callable[..., Tensor], *rows: Tensor | list[str]) -> Tensor:
        """fn over exactly self.chunk rows at a time (the last chunk padded by repeating its first row)."""
        total = len(rows[0])
        outs = []
        for start in range(0, total, self.chunk):
            parts = [r[start : start + self.chunk] for r in rows]
            real = len(parts[0])
            if real < self.chunk:
                pad = self.chunk - real
                parts = [
                    p + [p[0]] * pad
                    if isinstance(p, list)
                    else torch.cat([p, p[:1].expand(pad, *p.shape[1:])])
                    for p in parts
                ]
            outs.append(fn(*parts)[:real])
        return torch.cat(outs)

    def check(self, spec: GenerationSpec) -> tuple[int, int, int]:
        """Latent shape (C, h, w) of a request; InvalidRequestError if this model cannot take its size."""
        f = self.policy.vae_scale_factor
        for name, v in (("height", spec.height), ("width", spec.width)):
            if v is not None and v % f:
                raise InvalidRequestError(f"{name}={v} must be a multiple of {f} for this model's VAE")
        return self.policy.latent_shape(spec.height, spec.width)

    @torch.no_grad()
    def generate(self, model: LoadedModel, specs: list[GenerationSpec]) -> list[list[bytes]]:
        """PNG bytes of every image of every request (requests share ``batch_key``), in order."""
        if not specs:
            return []
        key = specs[0].batch_key()
        if any(s.batch_key() != key for s in specs):
            raise ValueError("generate() takes requests with one (height, width, steps, guidance, eta)")
        first = specs[0]
        shape = self.check(first)
        policy = self.policy
        with self._lock, self._active(model):
            t_grid = policy.time_grid(first.num_inference_steps)
            prompts = [s.prompt for s in specs for _ in range(s.n)]
            emb = self._chunked(policy.encode_prompts, prompts)
            guided = first.guidance_scale > 1.0  # as sampling._guided
            neg = None
            if guided:
                negatives = [s.negative_prompt for s in specs for _ in range(s.n)]
                neg = self._chunked(policy.encode_prompts, negatives)
            gens = [torch.Generator(device=policy.device).manual_seed(s.seed) for s in specs]

            def noise(like_shape: tuple[int, ...]) -> Tensor:
                draws = [
                    torch.randn((s.n, *like_shape), generator=g, device=policy.device, dtype=torch.float32)
                    for s, g in zip(specs, gens, strict=True)
                ]
                return torch.cat(draws)

            x = noise(shape)
            for k in range(first.num_inference_steps):
                t, s = t_grid[k], t_grid[k + 1]

                def eps_fn(x_c: Tensor, e_c: Tensor, n_c: Tensor | None = None, t=t) -> Tensor:
                    return policy.predict_eps(x_c, t, e_c, n_c, first.guidance_scale)

                eps = self._chunked(eps_fn, x, emb, neg) if guided else self._chunked(eps_fn, x, emb)
                mean, std = step_mean_std("ddim", policy.schedule, eps, x, t, s, first.eta)
                std = torch.as_tensor(std, device=mean.device).to(mean.dtype)
                std = std.reshape(std.shape + (1,) * (mean.dim() - std.dim())) if std.dim() else std
                x = mean + std * noise(tuple(mean.shape[1:]))  # as sde.sample_or_score
            pixels = images_to_uint8(self._chunked(policy.decode, x))
        out, i = [], 0
        for s in specs:
            out.append([encode_png(pixels[j]) for j in range(i, i + s.n)])
            i += s.n
        return out
