"""The base of every run-configuration section, and the error every config check raises.

One place for the rules every section follows: unknown keys are errors, assignments are validated, and no
float anywhere (a field, a list item, a dict value) may be NaN or +-inf: pydantic's ``allow_inf_nan=False``
rejects them before any bound is checked, so a new float field is covered without a check of its own.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value and what is allowed."""


class ConfigSection(BaseModel):
    """A section of the run config: no unknown keys, validated assignments, finite floats only."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
