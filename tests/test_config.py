"""Config: presets, YAML files, --set overrides and the errors users see."""

from __future__ import annotations

import pytest

from scoreaction.config import Config, ConfigError, build_config, parse_set


def test_default_is_tiny():
    cfg = build_config()
    assert cfg.model.preset == "tiny"
    # the tiny preset's values, not the fields' own defaults (run.epochs 3, sampler.num_steps 50)
    assert cfg == build_config("tiny") != Config()
    assert (cfg.run.epochs, cfg.sampler.num_steps, cfg.reward.name) == (8, 20, "jpeg_compressibility")


def test_set_values_parse_as_yaml():
    assert parse_set("sampler.num_steps=7") == {"sampler": {"num_steps": 7}}
    assert parse_set("run.prompts=[a, b]") == {"run": {"prompts": ["a", "b"]}}
    assert parse_set("model.name_or_path=null") == {"model": {"name_or_path": None}}
    cfg = build_config("tiny", overrides=["sampler.eta=0.5", "sampler.stepper=euler_maruyama"])
    assert cfg.sampler.eta == 0.5 and cfg.sampler.stepper == "euler_maruyama"


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sampler:\n  num_steps: 12\n  guidance_scale: 3.0\n")
    cfg = build_config("tiny", f, ["sampler.num_steps=13"])
    assert (cfg.sampler.num_steps, cfg.sampler.guidance_scale) == (13, 3.0)


def test_unknown_preset_lists_presets():
    with pytest.raises(
        ConfigError, match=r"preset='sd99' is unknown; allowed presets: tiny, toy-gmm, sd15, sd15-random"
    ):
        build_config("sd99")
    with pytest.raises(
        ConfigError, match=r"model.preset='sd99'.*'tiny', 'toy-gmm', 'sd15', 'sd15-random' or 'digits'"
    ):
        build_config("tiny", overrides=["model.preset=sd99"])


@pytest.mark.parametrize(
    "item, pattern",
    [
        ("sampler.num_steps=0", r"sampler.num_steps=0: Input should be greater than or equal to 1"),
        ("sampler.eta=-0.5", r"sampler.eta=-0.5: Input should be greater than or equal to 0"),
        ("sampler.eta=1.5", r"sampler.eta=1.5: Input should be less than or equal to 1"),
        ("sampler.stepper=dpm", r"sampler.stepper='dpm': Input should be 'ddim', 'euler_maruyama' or 'heun'"),
        ("algorithm.name=grpo", r"algorithm.name='grpo': Input should be 'ctrl' or 'ddpo'"),
        ("algorithm.estimator=reinforce", r"algorithm.estimator='reinforce': Input should be 'ratio' or"),
        ("algorithm.kl_coef=-0.1", r"algorithm.kl_coef=-0.1: Input should be greater than or equal to 0"),
        ("sampler.eta=0", r"algorithm.estimator='ratio' needs transition log-probs, .*sampler.eta=0"),
        ("sampler.height=100", r"sampler.height=100: Input should be a multiple of 8"),
        ("sampler.bogus=1", r"sampler.bogus=1: Extra inputs are not permitted"),
    ],
)
def test_bad_values_name_field_and_value(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config("tiny", overrides=[item])


@pytest.mark.parametrize(
    "items, pattern",
    [
        (["algorithm.name=ddpo", "sampler.eta=0"], r"algorithm.name='ddpo' needs transition log-probs"),
        (["sampler.stepper=heun"], r"sampler.eta=1.0: sampler.stepper='heun' is a deterministic ODE stepper"),
        (
            ["sampler.stepper=heun", "sampler.eta=0"],
            r"algorithm.estimator='ratio' needs .*sampler.stepper='heun'",
        ),
    ],
)
def test_deterministic_sampler_needs_the_value_gradient_estimator(items, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config("tiny", overrides=items)
    for ok in (["sampler.eta=0"], ["sampler.stepper=heun", "sampler.eta=0"]):
        cfg = build_config("tiny", overrides=[*ok, "algorithm.estimator=value_gradient"])
        assert cfg.sampler.eta == 0


def test_malformed_set_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like dotted.key=value"):
        parse_set("sampler.num_steps")
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("tiny", tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "items, pattern",
    [
        (["run.prompts=[]"], r"\n  run.prompts=\[\]: List should have at least 1 item"),
        (
            ["run.num_samples=30", "resources.num_learner_workers=4", "algorithm.micro_batch_size=8"],
            r"\n  run.num_samples=30 must be divisible by resources.num_learner_workers=4: each learner worker",
        ),
        (
            ["run.num_samples=32", "resources.num_learner_workers=4", "algorithm.micro_batch_size=6"],
            r"\n  algorithm.micro_batch_size=6 must be divisible by resources.num_learner_workers=4",
        ),
        (
            ["algorithm.stat_buffer=8", "algorithm.stat_min_count=16"],
            r"\n  algorithm.stat_min_count=16 must be <= algorithm.stat_buffer=8",
        ),
    ],
)
def test_empty_prompts_and_batch_sizes_that_do_not_divide_are_config_errors(items, pattern):
    """Caught when the config is built, before anything starts; the message is the check's own (no dump of
    the whole config)."""
    with pytest.raises(ConfigError, match=pattern) as info:
        build_config("tiny", overrides=items)
    assert "{" not in str(info.value)


def test_rollout_batches_and_micro_batches_need_not_divide_the_epoch():
    """The last rollout batch and the last micro-batch are smaller: no error (tests/test_learner.py runs
    such an epoch)."""
    cfg = build_config(
        "tiny", overrides=["run.num_samples=10", "sampler.batch_size=4", "algorithm.micro_batch_size=3"]
    )
    assert (cfg.run.num_samples, cfg.sampler.batch_size, cfg.algorithm.micro_batch_size) == (10, 4, 3)


def test_literal_values_are_not_yaml_and_set_values_still_are():
    cfg = build_config(
        "tiny",
        overrides=["run.prompts=[a cat, a dog]", "algorithm.kl_coef=1e-3", "run.output_dir=/set/value"],
        values={"run.output_dir": "/data/run #2"},
    )
    assert cfg.run.output_dir == "/data/run #2"
    assert cfg.run.prompts == ["a cat", "a dog"] and cfg.algorithm.kl_coef == 0.001
    for literal in ("null", "~", "yes", "123", "[a, b]", "{a: 1}", "run: x"):
        assert build_config("tiny", values={"run.output_dir": literal}).run.output_dir == literal


def test_every_config_section_rejects_non_finite_floats():
    """The shared base (scoreaction/config/base.py) covers every section, nested ones included;
    tests/test_nonfinite.py checks every float field."""
    from pydantic import BaseModel

    from scoreaction.config.base import ConfigSection

    def sections(model: type[BaseModel]):
        yield model
        for field in model.model_fields.values():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from sections(ann)

    found = list(sections(Config))
    assert len(found) > 10
    for model in found:
        assert issubclass(model, ConfigSection) and model.model_config["allow_inf_nan"] is False, model


def _leaf_fields(model, prefix: str = ""):
    """(dotted key, FieldInfo) of every field that is not itself a section, walking the pydantic models."""
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_help_text_has_every_field_of_every_section_with_its_default_and_description():
    """config_help() (the epilog of jobs/finetune.py --help): one '--set KEY=TYPE  (default X)' line per field,
    X read back as YAML equal to the field's own default, the description right under it, grouped under a
    heading per section."""
    import yaml

    from scoreaction.config import config_help

    text = config_help()
    lines = text.splitlines()
    leaves = dict(_leaf_fields(Config))
    assert len(leaves) > 80  # every section, the reward's options blocks included
    headers = {}
    for i, line in enumerate(lines):
        if line.startswith("  --set "):
            key, rest = line.removeprefix("  --set ").split("=", 1)
            headers[key] = (i, rest.split("  (default ", 1)[1].removesuffix(")"))
    assert sorted(headers) == sorted(leaves)
    for key, field in leaves.items():
        i, default = headers[key]
        assert yaml.safe_load(default) == field.get_default(call_default_factory=True), key
        described = []
        for line in lines[i + 1 :]:
            if not line.startswith("      ") or line.strip().startswith("presets:"):
                break
            described.append(line.strip())
        assert " ".join(described) == " ".join(field.description.split()), key
        section = key.rsplit(".", 1)[0]
        heading = max(j for j, line in enumerate(lines[:i]) if line and not line.startswith(" "))
        assert lines[heading].split(":", 1)[0] == section, key


def test_the_chosen_preset_is_recorded_and_is_not_a_setting():
    """run.preset names the --preset a config was built from (model.preset is the model: sd15 for the paper
    presets); it is filled in by build_config, survives a YAML file, and --help lists no preset values for it."""
    import typing

    from scoreaction.config import PRESETS, config_help, validate_config
    from scoreaction.config.run import PresetName

    assert list(typing.get_args(PresetName)) == list(PRESETS)
    for name in PRESETS:
        assert build_config(name).run.preset == name
    cfg = build_config("sd15-ctrl-paper")
    assert (cfg.run.preset, cfg.model.preset) == ("sd15-ctrl-paper", "sd15")
    assert Config().run.preset is None and validate_config({}).run.preset is None
    with pytest.raises(ConfigError, match=r"run.preset='sd99': Input should be 'tiny', 'toy-gmm'"):
        build_config("tiny", overrides=["run.preset=sd99"])
    lines = config_help().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  --set run.preset="))
    assert lines[at].endswith("(default null)")
    after = lines[at + 1 : next(j for j in range(at + 1, len(lines)) if lines[j].startswith("  --set "))]
    assert after and not any("presets:" in line for line in after)
