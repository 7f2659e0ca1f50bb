"""The reward section of the run configuration (its own module so the reward registry owns it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["linear", "jpeg_compressibility", "jpeg_incompressibility"] = Field(
        "jpeg_compressibility",
        description="Reward to maximise: linear (toy: a^T x), jpeg_(in)compressibility.",
    )
    direction: list[float] | None = Field(None, description="The vector a of the linear reward r(x) = a^T x.")
