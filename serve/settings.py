"""Settings of the image service: deploy-time arguments and the hot-reloadable ``user_config``.

``ServeSettings`` is the ``user_config`` of both deployments (serve/config.yaml shares one block between them
with a YAML anchor). A ``serve deploy`` (or any config update through the Serve controller) that changes it
reaches ``reconfigure`` on the running replicas without a restart. ``ModelArgs`` are the application
builder's ``args``; changing them redeploys the model replicas.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from scoreaction.config import ModelConfig
from scoreaction.serving.catalog import validate_model_id
from scoreaction.serving.spec import CostLimits

PROJECT_ROOT = Path(__file__).resolve().parents[1]
API_KEY_ENV = "SCOREACTION_API_KEY"


class FeedbackSettings(BaseModel):
    """Where the playground's preferences are stored (``user_config.feedback``)."""

    model_config = ConfigDict(extra="forbid")

    database_url: str = Field(
        "sqlite:///outputs/feedback.db",
        min_length=1,
        description="SQLAlchemy URL of the preference database: a SQLite file (a relative path is taken from "
        "the project root) or postgresql+psycopg://user:password@host:5432/db when several replicas or nodes "
        "write.",
    )
    cache_images: int = Field(
        64,
        ge=0,
        le=4096,
        description="Recently shown images each ingress replica keeps, so storing a comparison of images it "
        "just served needs no second generation (0: always regenerate).",
    )


class ServeSettings(BaseModel):
    """Hot-reloadable settings (``user_config``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint_root: str = Field(
        "outputs",
        description="Folder of fine-tuning runs (each with checkpoints/), or one run folder. Relative paths "
        "are taken from the project root (the folder holding serve/).",
    )
    default_model: str = Field("base", description="Model used when a request names none.")
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="A generation not done after this long answers 504; its compute stops within one step.",
    )
    retry_after_s: int = Field(
        1,
        ge=0,
        le=3600,
        description="Retry-After of the ingress's 503 and 504 answers (overload, not ready).",
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="Requests batched into one model call.")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, le=10, description="How long a batch waits to fill before it runs."
    )
    max_pixel_steps: int = Field(
        52_428_800,
        ge=1,
        description="Cost bound of one request: n x height x width x num_inference_steps (default: four "
        "512x512 images at 50 steps). More answers 422 naming the limit.",
    )
    max_side_factor: float = Field(
        2.0,
        gt=0,
        le=16,
        allow_inf_nan=False,
        description="Longest side a model serves, as a multiple of its native size (tiny 64 px, sd15 512 px).",
    )
    max_side_px: int | None = Field(
        None, ge=8, le=1024, description="Longest side in px for every model; None: max_side_factor decides."
    )
    model_wait_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description="How long a request for a model that is not loaded waits for a free slot of the LRU when "
        "every slot holds a model in use; then 503 + Retry-After.",
    )

    feedback: FeedbackSettings = Field(
        default_factory=FeedbackSettings,
        description="The preference store of /playground and /v1/preferences.",
    )

    @field_validator("default_model")
    @classmethod
    def _model_id(cls, v: str) -> str:
        validate_model_id(v)
        return v

    def limits(self) -> CostLimits:
        return CostLimits(self.max_pixel_steps, self.max_side_px, self.max_side_factor)

    def root(self) -> Path:
        p = Path(os.path.expanduser(self.checkpoint_root))
        return p if p.is_absolute() else PROJECT_ROOT / p


class ModelArgs(BaseModel):
    """Deploy-time arguments of the model deployment (the builder's ``args``)."""

    model_config = ConfigDict(extra="forbid")

    base_model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="The base model (preset, name_or_path, device, dtype); checkpoints load on top of it.",
    )
    max_loaded_models: int = Field(
        3, ge=1, le=64, description="LRU size: models (base or checkpoints) held per replica."
    )
    chunk: int = Field(
        4,
        ge=1,
        le=64,
        description="Samples per network call: batches run in chunks of exactly this many (padded), so an "
        "image's bytes never depend on its batch. Changing it changes the bits of every image.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch.set_num_threads in each model replica (None: Ray's default)."
    )
