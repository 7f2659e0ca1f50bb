"""The base of every run-configuration section (config.py, reward_config.py, resources_config.py).

One place for the rules every section follows: unknown keys are errors, assignments are validated, and no
float anywhere (a field, a list item, a dict value) may be NaN or +-inf: pydantic's ``allow_inf_nan=False``
rejects them before any bound is checked, so a new float field is covered without a check of its own.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
