"""The run section: seeds, epochs, samples per epoch, the prompts, where outputs and checkpoints go and how
often they are written."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from scoreaction.config.base import ConfigSection
from scoreaction.prompts import PROMPT_SETS, PromptFileError, PromptSet, builtin_prompts, read_prompts_file

# The names of the presets (scoreaction.config.presets.PRESETS; a test checks that the two agree).
PresetName = Literal["tiny", "toy-gmm", "sd15", "sd15-random", "sd15-ctrl-paper", "sd15-ddpo-paper", "digits"]


class RunConfig(ConfigSection):
    preset: PresetName | None = Field(
        None,
        description="The --preset this config was built from, filled in by build_config: a label (the "
        "resource plan of --dry-run names it), not a setting; the model is model.preset. Null: built without "
        "a preset.",
    )
    seed: int = Field(0, description="Seed of sampling noise, prompts and initialisation.")
    epochs: int = Field(
        3, ge=0, description="Fine-tuning epochs (rollout, reward, value update, policy update)."
    )
    checkpoint_every: int = Field(
        1, ge=1, description="Write a checkpoint every this many epochs (and at the end)."
    )
    keep_checkpoints: int | None = Field(
        None,
        ge=1,
        description="Keep only the newest this many checkpoints (never deleting the one 'latest' names); "
        "None = keep all.",
    )
    grid_every: int = Field(
        1, ge=1, description="Write a sample grid every this many epochs (image presets)."
    )
    output_dir: str = Field("outputs/run", description="Where checkpoints, logs, grids and summary.json go.")
    storage_path: str | None = Field(
        None,
        description="Shared storage (a path every node sees, or a URI) for Ray Train's run state; "
        "None = under output_dir.",
    )
    num_samples: int = Field(16, ge=1, description="Trajectories sampled per epoch.")
    eval_num_steps: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="Sampling step counts at which a fixed evaluation set (the same prompts and starting noise "
        "every time) is sampled with the current policy every run.eval_every epochs, after the update; logged "
        "as eval/steps_<N>/reward_mean and eval/steps_<N>/kl_continuous (the path KL as a continuous-time "
        "integral on that grid, comparable across N). Empty: no per-epoch evaluation. The paper: [25, 100], "
        "trained at 50.",
    )
    eval_every: int = Field(
        1, ge=1, description="Run the run.eval_num_steps evaluation every this many epochs."
    )
    eval_num_samples: int | None = Field(
        None,
        ge=1,
        description="Samples of the fixed evaluation set; None = one rollout batch (sampler.batch_size).",
    )
    prompts: list[str] = Field(
        default_factory=lambda: [
            "a photo of a cat",
            "a watercolor painting of a lighthouse",
            "a red bicycle leaning on a wall",
            "a bowl of ramen, studio lighting",
        ],
        min_length=1,
        description="Prompt set sampled from (round robin); at least one. Filled from run.prompts_file or "
        "run.prompt_set when one of them is set.",
    )
    prompts_file: str | None = Field(
        None,
        description="A text file of prompts, one a line (blank lines and lines starting with # are skipped), "
        "read when the config is built; its prompts become run.prompts.",
    )
    prompt_set: PromptSet | None = Field(
        None,
        description="A built-in prompt set, shipped with the package: single_prompt (the authors' ImageReward "
        "prompt, 'A unicorn in a clearing...'), simple_animals (ddpo-pytorch's 45 animals), imagenet_animals "
        "(ddpo-pytorch's 398 ImageNet animal classes); its prompts become run.prompts.",
    )

    @model_validator(mode="before")
    @classmethod
    def _load_prompts(cls, data: Any) -> Any:
        """run.prompts from run.prompts_file or run.prompt_set. A config that already lists the prompts
        (one re-validated from its dump, e.g. on a learner worker where the file is not) keeps them when the
        file cannot be read there; prompts that differ from the file's or the set's are an error."""
        if not isinstance(data, dict):
            return data
        file, name = data.get("prompts_file"), data.get("prompt_set")
        if file is None and name is None:
            return data
        if file is not None and name is not None:
            raise ValueError(
                f"run.prompts_file={file!r} and run.prompt_set={name!r}: set one of them (both give run.prompts)"
            )
        if name is not None and name not in PROMPT_SETS:
            return data  # the field's own check names the allowed sets
        if file is not None and not isinstance(file, str):
            return data  # the field's own check reports the type
        given = data.get("prompts")
        try:
            loaded = builtin_prompts(name) if name is not None else read_prompts_file(file)
        except PromptFileError:
            if given is not None and file is not None:
                return data
            raise
        source = f"run.prompt_set={name!r}" if name is not None else f"run.prompts_file={file!r}"
        if given is not None and list(given) != loaded:
            raise ValueError(
                f"run.prompts (a list of {len(given)}) differs from the {len(loaded)} prompts of {source}: "
                f"set one of them (e.g. {source.split('=')[0]}=null)"
            )
        return {**data, "prompts": loaded}
