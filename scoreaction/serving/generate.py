"""Image generation for serving: one base model, checkpoints as extra adapters on it, deterministic batches.

``ImageGenerator`` holds one ``DiffusionPolicy`` (the base model). A LoRA checkpoint is loaded as one more
named peft adapter on the same UNet (a few MB each, so an LRU of several costs almost nothing); a full
fine-tune checkpoint as its own UNet. ``generate`` samples with the training sampler's step
(``policy.time_grid``, ``policy.predict_eps``, ``sde.step``: DDIM with the request's eta) but keeps no
latents, log-probs or reference values.

Determinism. A request's noise comes from its own ``torch.Generator(seed)`` in the order
``sample_trajectories`` draws it (initial latents, then one draw per step), so a lone request equals
``sample_trajectories(policy, [prompt] * n, sampler, Generator().manual_seed(seed))``. CPU (and GPU) kernels
pick their blocking by batch shape, so a sample's float32 result depends on how many rows share its UNet call
(measured on ``tiny``: odd batch sizes move epsilon by ~4e-6), though not on its position or its neighbours.
So every network call here (text encoder, UNet, VAE) runs on exactly ``chunk`` samples, padding the last
chunk: an image's bytes then depend only on its seed, its parameters, the model and ``chunk``, never on which
other requests were batched with it. The step itself is elementwise, so it runs per request (on that
request's generator) without changing a bit.

Cancellation. Each request may carry a ``CancelToken`` (``spec.py``). ``generate`` checks the tokens while it
waits for the lock and before every denoising step: the rows of cancelled requests are dropped (the others'
bytes do not change, see above), and once every request of the call is cancelled it raises
``GenerationCancelled`` and frees the lock, so the compute stops within one step.

Cost. ``check`` bounds a request by ``CostLimits``: its longest side (by default a small multiple of the
model's native size) and its pixel-steps, n x height x width x steps (``InvalidRequestError``, HTTP 422).

Loading. A checkpoint that cannot be loaded (truncated or missing weights, non-finite values, keys that do not
fit) raises ``UnusableModelError`` (HTTP 422). Which models stay loaded is ``model_cache.ModelCache``'s call.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from scoreaction.checkpoint import CheckpointError, load_lora_state
from scoreaction.config import ModelConfig
from scoreaction.policy import DiffusionPolicy
from scoreaction.sde import step
from scoreaction.serving.api import pixel_steps
from scoreaction.serving.catalog import UnusableModelError, read_meta
from scoreaction.serving.spec import (
    CancelToken,
    CostLimits,
    GenerationCancelled,
    GenerationSpec,
    InvalidRequestError,
)

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model a replica holds: the base (adapter None, unet None), a LoRA adapter, or a full UNet."""

    key: str
    adapter: str | None = None
    unet: torch.nn.Module | None = None
    _owner: ImageGenerator | None = None
    unloaded: bool = False  # set once its adapter or UNet is freed: generating with it is a bug

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

    def load(self, key: str, path: str | None, model_id: str | None = None) -> LoadedModel:
        """Load a checkpoint folder (safetensors only; pickles refused) or, with path None, the base model.
        Raises UnusableModelError, naming model_id (never the server path), for a checkpoint that cannot
        be served: invalid metadata, missing or truncated weights, non-finite values, keys that do not fit."""
        if path is None:
            return LoadedModel(key=key)
        name = model_id or key
        meta = read_meta(Path(path), name)  # refuses pickle-only folders, checks kind
        try:
            return self._load(key, Path(path), meta)
        except (MemoryError, torch.OutOfMemoryError):
            raise  # the replica's trouble, not the checkpoint's
        except Exception as exc:
            lines = str(exc).replace(str(path), name).strip().splitlines() or [""]
            raise UnusableModelError(
                f"model={name!r} cannot be loaded: {type(exc).__name__}: {lines[0][:300]}"
            ) from exc

    def _load(self, key: str, path: Path, meta: dict) -> LoadedModel:
        if meta.get("base_model") not in (None, self.policy.base_model):
            logger.warning(
                "checkpoint %s was trained on base_model=%r; this replica serves %r",
                path,
                meta.get("base_model"),
                self.policy.base_model,
            )
        if meta["kind"] == "lora":
            return self._load_lora(key, path, meta)
        if meta["kind"] == "full":
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True)
            _check_finite(unet.state_dict())
            unet.requires_grad_(False).eval().to(self.policy.device, self.policy.dtype)
            return LoadedModel(key=key, unet=unet, _owner=self)
        raise CheckpointError(f"it is a {meta['kind']!r} checkpoint; only lora and full serve")

    def _load_lora(self, key: str, path: Path, meta: dict) -> LoadedModel:
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        lora = meta.get("lora") or {}
        policy_cfg = (meta.get("config") or {}).get("policy", {})
        rank = lora.get("rank") or policy_cfg.get("lora_rank") or self.policy.cfg.lora_rank
        state = load_lora_state(path)
        _check_finite(state)
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
                    raise CheckpointError(f"it has LoRA keys this model lacks: {result.unexpected_keys[:3]}")
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
            model.unloaded = True

    @contextlib.contextmanager
    def _active(self, model: LoadedModel) -> Iterator[None]:
        """Within this context the policy predicts with the given model (caller holds the lock)."""
        if model.unloaded:
            raise RuntimeError(f"model {model.key!r} was unloaded while a request still used it")
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

    def check(self, spec: GenerationSpec, limits: CostLimits | None = None) -> tuple[int, int, int]:
        """Latent shape (C, h, w) of a request; InvalidRequestError if this model cannot take its size or it
        exceeds the limits."""
        f = self.policy.vae_scale_factor
        for name, v in (("height", spec.height), ("width", spec.width)):
            if v is not None and v % f:
                raise InvalidRequestError(
                    f"{name}={v} must be a multiple of {f} for this model's VAE",
                    param=name,
                    code="invalid_size",
                )
        if limits is not None:
            self._check_limits(spec, limits)
        return self.policy.latent_shape(spec.height, spec.width)

    def _check_limits(self, spec: GenerationSpec, limits: CostLimits) -> None:
        native = self.default_size
        height, width = spec.height or native, spec.width or native
        if limits.max_side_px is not None:
            max_side, how = limits.max_side_px, "max_side_px"
        else:
            max_side = int(limits.max_side_factor * native) // self.policy.vae_scale_factor
            max_side *= self.policy.vae_scale_factor
            how = f"max_side_factor={limits.max_side_factor:g} x the model's native {native} px"
        for name, v in (("height", height), ("width", width)):
            if v > max_side:
                raise InvalidRequestError(
                    f"{name}={v} is larger than this model serves: at most {max_side} px ({how}; "
                    "see serve/config.yaml)",
                    param=name,
                    code="size_limit",
                    limit={"name": "max_side_px", "value": v, "allowed": max_side},
                )
        cost = pixel_steps(spec.n, height, width, spec.num_inference_steps)
        if limits.max_pixel_steps is not None and cost > limits.max_pixel_steps:
            raise InvalidRequestError(
                f"the request costs n x height x width x num_inference_steps = {spec.n} x {height} x {width} x "
                f"{spec.num_inference_steps} = {cost} pixel-steps; max_pixel_steps={limits.max_pixel_steps} "
                "allows at most that: ask for fewer images, pixels or steps",
                param=None,
                code="cost_limit",
                limit={"name": "max_pixel_steps", "value": cost, "allowed": limits.max_pixel_steps},
            )

    def _acquire(self, tokens: Sequence[CancelToken | None]) -> bool:
        """Take the lock, or give up (False) once every token is cancelled."""
        while not self._lock.acquire(timeout=0.05):
            if all(t is not None and t.cancelled for t in tokens):
                return False
        return True

    @torch.no_grad()
    def generate(
        self,
        model: LoadedModel,
        specs: list[GenerationSpec],
        tokens: Sequence[CancelToken | None] | None = None,
    ) -> list[list[bytes] | None]:
        """PNG bytes of every image of every request (requests share ``batch_key``), in order; None for a
        request whose token was cancelled. Raises GenerationCancelled once every request is cancelled."""
        if not specs:
            return []
        key = specs[0].batch_key()
        if any(s.batch_key() != key for s in specs):
            raise ValueError("generate() takes requests with one (height, width, steps, guidance, eta)")
        tokens = list(tokens) if tokens is not None else [None] * len(specs)
        if len(tokens) != len(specs):
            raise ValueError(f"{len(tokens)} tokens for {len(specs)} requests")
        first = specs[0]
        shape = self.check(first)
        policy = self.policy
        alive = list(range(len(specs)))  # requests still wanted, in order; their rows make up x, emb, neg

        def spans() -> list[tuple[int, int, int]]:
            """(request, first row, end row) of every request still wanted, in row order."""
            out, row = [], 0
            for i in alive:
                out.append((i, row, row + specs[i].n))
                row += specs[i].n
            return out

        def drop_cancelled(*rows: Tensor | None) -> list[Tensor | None]:
            """Drop the rows of requests cancelled since the last call (raise once none is left)."""
            nonlocal alive
            keep = [i for i in alive if tokens[i] is None or not tokens[i].cancelled]
            if not keep:
                reasons = sorted({t.reason for t in tokens if t is not None})
                raise GenerationCancelled(f"every request was cancelled ({', '.join(reasons)})")
            if keep == alive:
                return list(rows)
            index = torch.tensor([j for i, a, b in spans() if i in keep for j in range(a, b)])
            alive = keep
            return [r if r is None else r[index.to(r.device)] for r in rows]

        if not self._acquire(tokens):
            drop_cancelled()  # raises
        try:
            with self._active(model):
                drop_cancelled()
                t_grid = policy.time_grid(first.num_inference_steps)
                prompts = [specs[i].prompt for i in alive for _ in range(specs[i].n)]
                emb = self._chunked(policy.encode_prompts, prompts)
                guided = first.guidance_scale > 1.0  # as sampling._guided
                neg = None
                if guided:
                    negatives = [specs[i].negative_prompt for i in alive for _ in range(specs[i].n)]
                    neg = self._chunked(policy.encode_prompts, negatives)
                gens = {i: torch.Generator(device=policy.device).manual_seed(specs[i].seed) for i in alive}
                x = torch.cat(
                    [
                        torch.randn(
                            (specs[i].n, *shape), generator=gens[i], device=policy.device, dtype=torch.float32
                        )
                        for i in alive
                    ]
                )
                for k in range(first.num_inference_steps):
                    x, emb, neg = drop_cancelled(x, emb, neg)  # the compute stops within one step
                    t, s = t_grid[k], t_grid[k + 1]

                    def eps_fn(x_c: Tensor, e_c: Tensor, n_c: Tensor | None = None, t=t) -> Tensor:
                        return policy.predict_eps(x_c, t, e_c, n_c, first.guidance_scale)

                    eps = self._chunked(eps_fn, x, emb, neg) if guided else self._chunked(eps_fn, x, emb)
                    # the sampler's step, per request on its own generator (elementwise: no bit changes)
                    x = torch.cat(
                        [
                            step(
                                "ddim", policy.schedule, eps[a:b], x[a:b], t, s, first.eta, generator=gens[i]
                            ).x_next
                            for i, a, b in spans()
                        ]
                    )
                (x,) = drop_cancelled(x)
                pixels = images_to_uint8(self._chunked(policy.decode, x))
        finally:
            self._lock.release()
        out: list[list[bytes] | None] = [None] * len(specs)
        for i, a, b in spans():
            out[i] = [encode_png(pixels[j]) for j in range(a, b)]
        return out


def _check_finite(state: dict[str, Tensor]) -> None:
    for name, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"its weights hold non-finite values (NaN or Inf) in {name}")
