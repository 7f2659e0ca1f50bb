"""HTTP request and response models of the serving API (pydantic; no Ray, no torch).

Two generation calls:

- ``POST /v1/generate``: the native call (``GenerateRequest``): prompt, negative prompt, steps, guidance,
  DDIM eta, seed, height, width, n, model.
- ``POST /v1/images/generations``: the subset of the OpenAI Images API that maps onto it
  (``OpenAIImageRequest``: prompt, n, size "WxH", response_format "b64_json", model), so an OpenAI client
  works unchanged.

Every bound lives here, once, and the error a client sees names the field, the value and what is allowed.
Models are strict: "20" is not an integer, ``true`` is not a number, NaN and infinity are not finite, and text
is valid Unicode: a string holding a lone UTF-16 surrogate (JSON can carry ``"\\ud800"``) is refused, since
neither the tokenizer nor UTF-8 can take it. Sizes are ASCII digits ("５１２x５１２" is refused, though ``int``
would read it). The cost of a request (``pixel_steps``) is bounded by the service's settings, checked where the
model's native size is known (the model replica).
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_PROMPT_CHARS = 1000  # CLIP reads 77 tokens; 1000 characters is far more than it can use.
MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 8, 1024, 8
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_N = 4
MAX_SEED = 2**63 - 1
MAX_BODY_BYTES = 64 * 1024
_SIZE_RE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # fullmatch: ASCII digits only, no trailing newline
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone UTF-16 surrogate in text, or None. (json.loads joins escaped pairs such as
    "\\ud83d\\ude00" into one character, so any surrogate left in a decoded string is a lone one.)"""
    m = _SURROGATE_RE.search(text)
    return m.start() if m else None


def clean_text(text: str) -> str:
    """text with every lone surrogate replaced by U+FFFD, so it always encodes as UTF-8."""
    return _SURROGATE_RE.sub("\ufffd", text) if lone_surrogate(text) is not None else text


def pixel_steps(n: int, height: int, width: int, steps: int) -> int:
    """The cost of a request: images x pixels x denoising steps (what the UNet's work scales with)."""
    return n * height * width * steps


def check_size(name: str, value: int | None) -> int | None:
    """A side length in px: None (model default) or a multiple of 8 within [8, 1024]."""
    if value is None:
        return None
    if not (MIN_SIZE <= value <= MAX_SIZE and value % SIZE_MULTIPLE == 0):
        raise ValueError(
            f"{name}={value} is not allowed: use a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, v: object, info: ValidationInfo) -> object:
        if isinstance(v, str) and (i := lone_surrogate(v)) is not None:
            raise ValueError(
                f"{info.field_name} holds a lone UTF-16 surrogate ({ascii(v[i])}) at character {i}: not valid "
                "Unicode text; send UTF-8, or \\u escapes only of whole surrogate pairs"
            )
        return v


class GenerateRequest(_Strict):
    """The native generation call. Same seed and parameters give byte-identical PNGs."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Text prompt.")
    negative_prompt: str = Field(
        "", max_length=MAX_PROMPT_CHARS, description="Prompt of the unconditional branch of guidance."
    )
    num_inference_steps: int = Field(20, ge=1, le=MAX_STEPS, description="Denoising steps N (1..150).")
    guidance_scale: float = Field(
        7.5, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, description="Classifier-free guidance w (0..30)."
    )
    eta: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="DDIM eta in (0, 1]: 1 is DDPM ancestral sampling, the reverse SDE used in training.",
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of the noise; omitted: a random one (returned)."
    )
    height: int | None = Field(None, description="Image height in px: a multiple of 8 in 8..1024.")
    width: int | None = Field(None, description="Image width in px: a multiple of 8 in 8..1024.")
    n: int = Field(1, ge=1, le=MAX_N, description="Images to generate (1..4), all from the one seed.")
    model: str | None = Field(
        None, max_length=200, description="Model id (see GET /v1/models); omitted: the default model."
    )

    @field_validator("height", "width")
    @classmethod
    def _size(cls, v: int | None, info) -> int | None:
        return check_size(info.field_name, v)


class OpenAIImageRequest(_Strict):
    """OpenAI Images API (``images.generate``) subset. ``quality``, ``style`` and ``user`` are accepted and
    ignored so existing clients work; ``response_format`` must be ``b64_json`` (no hosted URLs)."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, max_length=200)
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = Field(None, description="'WIDTHxHEIGHT', e.g. '64x64'; omitted: the model's default.")
    response_format: Literal["b64_json"] = Field(
        "b64_json", description="Only b64_json: this service does not host image URLs."
    )
    quality: str | None = Field(None, max_length=32)
    style: str | None = Field(None, max_length=32)
    user: str | None = Field(None, max_length=256)

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = _SIZE_RE.fullmatch(v)
        if not m:
            raise ValueError(f"size={ascii(v)} must look like 'WIDTHxHEIGHT' in ASCII digits, e.g. '64x64'")
        check_size("width", int(m.group(1)))
        check_size("height", int(m.group(2)))
        return v

    def to_native(self, steps: int, guidance_scale: float) -> GenerateRequest:
        width = height = None
        if self.size is not None:
            m = _SIZE_RE.fullmatch(self.size)
            assert m is not None  # checked by _size
            width, height = int(m.group(1)), int(m.group(2))
        return GenerateRequest(
            prompt=self.prompt,
            n=self.n,
            model=self.model,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
        )


class Timings(BaseModel):
    queue_ms: float = Field(description="From arrival at the model replica to the start of its batch.")
    generate_ms: float = Field(description="Sampling, decoding and PNG encoding of the whole batch.")
    total_ms: float = Field(description="From arrival at the HTTP ingress to the response.")
    batch_size: int = Field(description="Requests generated together in this request's batch.")


class GeneratedImage(BaseModel):
    b64_png: str = Field(description="PNG, base64.")


class GenerateResponse(BaseModel):
    model: str = Field(description="The model id that generated the images (a run alias resolved).")
    seed: int
    width: int
    height: int
    images: list[GeneratedImage]
    timings: Timings


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class ModelInfo(BaseModel):
    id: str = Field(description="'base', a run name (its latest checkpoint) or 'RUN@step_NNNNNN'.")
    object: Literal["model"] = "model"
    owned_by: str = "scoreaction"
    created: int = Field(description="Unix time the checkpoint was written (0 for the base model).")
    kind: Literal["base", "run", "checkpoint"]
    run: str | None = None
    step: int | None = None
    reward: float | None = Field(None, description="Mean reward (see reward_source).")
    reward_name: str | None = None
    reward_source: str | None = Field(
        None,
        description="'summary.final' (the finished run's final evaluation) or "
        "'checkpoint.metrics' (the mean reward of the rollout of the epoch that wrote the checkpoint).",
    )
    alias_of: str | None = Field(None, description="For a run: the checkpoint id it currently names.")
    base_model: str | None = None
    available: bool = Field(
        True, description="False for a checkpoint or run that cannot be served now (see reason)."
    )
    reason: str | None = Field(None, description="Why the model is unavailable (available: false).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    default: str
    data: list[ModelInfo]


def jsonable(value: object, max_chars: int = 80) -> object:
    """A request value safe to echo in a JSON error: finite numbers as is, others as text, long text cut, lone
    surrogates replaced (so the error body always encodes)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        text = clean_text(value)
        return f"{text[:max_chars]}... ({len(text)} characters)" if len(text) > max_chars else text
    if isinstance(value, bool | float) or value is None:
        return value
    if isinstance(value, int):
        if value.bit_length() > 10_000:  # str() refuses ints past 4300 digits
            return f"an integer of {value.bit_length()} bits"
        text = str(value)
        return value if len(text) <= 20 else f"{text[:20]}... ({len(text)} digits)"
    text = clean_text(repr(value))
    return text if len(text) <= max_chars else f"{text[:max_chars]}... ({type(value).__name__})"
