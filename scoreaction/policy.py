"""The policy pi_theta(a | t, x, c): an SD UNet whose (guided) score is the action.

LoRA goes through peft via diffusers' adapter integration (``unet.add_adapter``); the reference policy
s_pre is the same UNet with the adapter disabled, so there is no second copy of the network. With
``policy.mode = "full"`` every UNet weight trains and a frozen copy serves as the reference.

Precision: frozen weights live in the compute dtype (bf16/fp16 on CUDA, fp32 on CPU), trainable
weights in fp32, the UNet runs under autocast, and everything the math consumes (epsilon, latents,
log-probs) comes back as float32.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from torch import Tensor

from scoreaction.config import ModelConfig, PolicyConfig
from scoreaction.models.presets import resolve_device, resolve_dtype
from scoreaction.models.tokenizer import tokenize
from scoreaction.sde import DiscreteVPSchedule, classifier_free_guidance, model_output_to_eps

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to device; cast only when the dtype differs (diffusers warns on no-op casts)."""
    module.to(device)
    if module.dtype != dtype:
        module.to(dtype=dtype)
    return module


class DiffusionPolicy(torch.nn.Module):
    """Wraps an SD pipeline's components as a policy with a reference.

    Attributes: unet, vae, text_encoder, tokenizer, schedule (continuous alpha_bar), prediction_type.
    """

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        policy_cfg: PolicyConfig | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        base_model: str = "",
    ) -> None:
        super().__init__()
        self.cfg = policy_cfg or PolicyConfig()
        self.device = torch.device(device)
        self.dtype = dtype
        self.base_model = base_model
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.scheduler_config = dict(pipe.scheduler.config)
        self.schedule = DiscreteVPSchedule.from_scheduler_config(self.scheduler_config)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        _move(self.vae, self.device, dtype)
        _move(self.text_encoder, self.device, dtype)
        self._ref_unet: torch.nn.Module | None = None
        if self.cfg.mode == "lora":
            _move(self.unet, self.device, dtype)
            self.unet.add_adapter(
                LoraConfig(
                    r=self.cfg.lora_rank,
                    lora_alpha=self.cfg.lora_alpha or self.cfg.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(self.cfg.lora_target_modules),
                ),
                adapter_name=ADAPTER_NAME,
            )
            for name, p in self.unet.named_parameters():
                if "lora_" in name:
                    p.data = p.data.float()
                    p.requires_grad_(True)
        else:
            self._ref_unet = _move(copy.deepcopy(self.unet), self.device, dtype)
            _move(self.unet, self.device, torch.float32)
            self.unet.requires_grad_(True)
        if self.cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # ModelMixin.dtype walks every parameter; looked up once here, not per UNet call.
        self.unet_input_dtype = dtype if self.cfg.mode == "lora" else torch.float32

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, policy_cfg: PolicyConfig | None = None) -> DiffusionPolicy:
        from scoreaction.models.presets import load_pipeline

        device = resolve_device(model_cfg.device)
        dtype = resolve_dtype(model_cfg.dtype, device)
        if torch.device(device).type == "cuda":
            # process-wide switches: TF32 tensor cores for fp32 matmuls/convolutions (trainable weights)
            torch.backends.cuda.matmul.allow_tf32 = model_cfg.tf32
            torch.backends.cudnn.allow_tf32 = model_cfg.tf32
        pipe = load_pipeline(model_cfg)
        base = model_cfg.name_or_path or model_cfg.preset
        policy = cls(pipe, policy_cfg, device=device, dtype=dtype, base_model=base)
        if model_cfg.compile != "off":
            # in place (nn.Module.compile): the UNet keeps its type, adapters and attributes
            policy.unet.compile(mode=model_cfg.compile)
            if policy._ref_unet is not None:
                policy._ref_unet.compile(mode=model_cfg.compile)
        return policy

    # ----------------------------------------------------------------------------------------------
    # Parameters and the reference policy
    # ----------------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """LoRA weights (peft key names) or the full UNet state, detached on CPU."""
        if self.cfg.mode == "lora":
            from peft.utils import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER_NAME)
        else:
            state = self.unet.state_dict()
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.cfg.mode == "lora":
            from peft.utils import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.unet, state, adapter_name=ADAPTER_NAME)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(
                    f"LoRA state has keys the policy does not know: {result.unexpected_keys[:5]}"
                )
        else:
            self.unet.load_state_dict(state)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context predict_eps evaluates the reference (pretrained) policy s_pre."""
        if self.cfg.mode == "lora":
            self.unet.disable_adapters()
            try:
                yield
            finally:
                self.unet.enable_adapters()
        else:
            live, self.unet = self.unet, self._ref_unet
            try:
                yield
            finally:
                self.unet = live

    # ----------------------------------------------------------------------------------------------
    # Forward pieces
    # ----------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """prompts -> CLIP hidden states (B, 77, D) in the compute dtype."""
        ids = tokenize(self.tokenizer, list(prompts)).to(self.device)
        return self.text_encoder(ids)[0]

    def predict_eps(
        self,
        x_t: Tensor,
        t: Tensor,
        prompt_embeds: Tensor,
        negative_prompt_embeds: Tensor | None,
        guidance_scale: float,
    ) -> Tensor:
        """Guided epsilon at (t, x_t), float32 (B, C, H, W). t: scalar continuous time (float64).

        Guidance runs as one UNet batch [uncond; cond] of 2B, as diffusers does, when w > 1.
        """
        tau = self.schedule.model_timestep(torch.as_tensor(t)).to(torch.float32).to(self.device)
        use_cfg = guidance_scale > 1.0 and negative_prompt_embeds is not None
        x_in = torch.cat([x_t, x_t]) if use_cfg else x_t
        emb = torch.cat([negative_prompt_embeds, prompt_embeds]) if use_cfg else prompt_embeds
        with self._autocast():
            dt = self.unet_input_dtype
            out = self.unet(x_in.to(dt), tau, encoder_hidden_states=emb.to(dt)).sample
        out = out.float()
        if self.prediction_type != "epsilon":
            ab = torch.exp(self.schedule.log_alpha_bar(torch.as_tensor(t))).to(self.device)
            out = model_output_to_eps(out, x_in.float(), ab, self.prediction_type)
        if use_cfg:
            eps_uncond, eps_cond = out.chunk(2)
            return classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)
        return out

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, H, W) float32 in [0, 1].

        Differentiable in the latents when they require grad (and grad mode is on): the value-gradient
        estimator takes grad_x of cos(pi t/2) R(decode(x0_hat(x))). The VAE's weights stay frozen; other
        calls build no graph."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and latents.requires_grad):
            z = latents.to(self.device, self.dtype) / self.vae.config.scaling_factor
            images = self.vae.decode(z).sample.float()
            return (images / 2 + 0.5).clamp(0, 1)

    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        size = self.unet.config.sample_size * self.vae_scale_factor
        h, w = height or size, width or size
        for name, v in (("sampler.height", h), ("sampler.width", w)):
            if v % self.vae_scale_factor:
                raise ValueError(f"{name}={v} must be a multiple of {self.vae_scale_factor} for this VAE")
        return self.unet.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor

    def time_grid(self, num_steps: int) -> Tensor:
        """t_0 > ... > t_N (N + 1,) float64 on diffusers' DDIM timesteps for this scheduler config.

        t_k = (tau_k + 1) / T for the scheduler's timesteps tau_k; the last step goes to tau - T // N, or
        to the first training level t = 1 / T when that is below zero (diffusers' final_alpha_cumprod
        with set_alpha_to_one=False; with True it would end at alpha_bar = 1, where DDIM's last step
        has sigma = 0 and no density, so we stop at 1 / T as well).
        """
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"sampler.num_steps={num_steps!r} must be an integer >= 1")
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_steps)
        n_train = self.schedule.num_train_timesteps
        taus = scheduler.timesteps.to(torch.float64)
        prev = float(taus[-1]) - n_train // num_steps
        t_last = (prev + 1) / n_train if prev >= 0 else 1.0 / n_train
        return torch.cat([(taus + 1) / n_train, torch.tensor([t_last], dtype=torch.float64)])
