"""Run configuration: pydantic models with one documented field per knob, presets, YAML and --set overrides.

    base.py        ConfigSection (no unknown keys, no NaN/inf) and ConfigError
    run.py         run: seeds, epochs, samples, prompts, output folder, checkpoint cadence
    model.py       model and policy: the pretrained model (or toy) and which weights train
    sampler.py     sampler: the reverse process that generates trajectories
    algorithm.py   algorithm and value: ctrl/ddpo, objective, optimiser, batch layout, F_phi
    reward.py      reward: what is maximised or monitored, and where it is scored
    resources.py   resources: the Ray actors of a distributed run
    schema.py      Config: every section together and the checks across sections
    presets.py     the named presets
    build.py       build_config: preset, YAML file, --set overrides, validation errors naming each field
    help.py        the config as text: ``jobs/finetune.py --help`` and ``--print-config``

Everything a caller needs is importable from ``scoreaction.config``.
"""

from scoreaction.config.algorithm import AlgorithmConfig, ValueConfig
from scoreaction.config.base import ConfigError, ConfigSection
from scoreaction.config.build import (
    _merge,
    build_config,
    format_validation_error,
    parse_set,
    set_value,
    validate_config,
)
from scoreaction.config.help import SECTION_ORDER, config_help, config_sections, config_yaml
from scoreaction.config.model import (
    DEFAULT_SD15_ID,
    MODEL_PRESETS,
    ModelConfig,
    ModelPreset,
    PolicyConfig,
    ToyConfig,
)
from scoreaction.config.presets import PRESETS, preset
from scoreaction.config.resources import ResourcesConfig
from scoreaction.config.reward import RewardConfig, RewardName
from scoreaction.config.run import RunConfig
from scoreaction.config.sampler import SamplerConfig
from scoreaction.config.schema import Config

__all__ = [
    "DEFAULT_SD15_ID",
    "MODEL_PRESETS",
    "PRESETS",
    "SECTION_ORDER",
    "AlgorithmConfig",
    "Config",
    "ConfigError",
    "ConfigSection",
    "ModelConfig",
    "ModelPreset",
    "PolicyConfig",
    "ResourcesConfig",
    "RewardConfig",
    "RewardName",
    "RunConfig",
    "SamplerConfig",
    "ToyConfig",
    "ValueConfig",
    "_merge",
    "build_config",
    "config_help",
    "config_sections",
    "config_yaml",
    "format_validation_error",
    "parse_set",
    "preset",
    "set_value",
    "validate_config",
]
