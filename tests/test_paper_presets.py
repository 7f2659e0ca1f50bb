"""The presets sd15-ctrl-paper and sd15-ddpo-paper carry the authors' settings of the SD1.5 ImageReward
experiment, and `finetune.py --preset sd15-ctrl-paper --dry-run` prints the plan and where to put the
weights on a machine without them.

The expected values are written here from the authors' files (github.com/hanyang1999/ContTimeRL4DM,
ddpo_continuous/; 4 GPUs per run in jobs.sh):
  B = 82b2ca60aed3585ad68e1d19c9edc7a461740f27: config/base.py, config/dgx.py, jobs.sh, setup.py
      (diffusers 0.17.1), scripts/train_with_valuefunc_cont.py, scripts/src/ImageReward_VN_train.py
  V = d1d7c02a9c1811beea3a5880ef12a940319f611d: config/dgx_with_value_func.py
  P = 5b6105a0c0f2cf643f73631d62fad25130c9fd47: ddpo_pytorch/assets/single_prompt.txt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from scoreaction.config import DEFAULT_SD15_ID, build_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import finetune  # noqa: E402

UNICORN = "A unicorn in a clearing. it has a single shining horn. volumetric light."  # P

COMMON = {
    "model.preset": "sd15",
    "model.name_or_path": DEFAULT_SD15_ID,  # B base.py: runwayml/stable-diffusion-v1-5 (same weights)
    "policy.mode": "lora",  # B base.py use_lora = True
    "policy.lora_rank": 4,  # diffusers 0.17.1 LoRAAttnProcessor default rank
    "policy.lora_alpha": None,  # no network_alpha: scale 1
    "policy.lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"],  # every attention processor
    "sampler.stepper": "ddim",
    "sampler.num_steps": 50,  # B base.py sample.num_steps
    "sampler.eta": 1.0,  # B base.py sample.eta
    "sampler.guidance_scale": 7.0,  # B base.py sample.guidance_scale
    "reward.name": "imagereward",  # B dgx.py / V imagereward(): reward_fn
    "reward.normalize": "none",  # raw ImageReward scores
    "algorithm.kl_coef": 0.0,  # B base.py use_regularization = False
    "algorithm.adv_clip": 5.0,  # B base.py train.adv_clip_max
    "algorithm.max_grad_norm": 1.0,  # B base.py train.max_grad_norm
    "algorithm.weight_decay": 1e-4,  # B base.py train.adam_weight_decay
    "algorithm.timestep_fraction": 1.0,  # B base.py train.timestep_fraction
    "algorithm.updates_per_epoch": 1,  # B base.py train.num_inner_epochs
    "algorithm.lr_schedule": "constant",
    "run.epochs": 100,  # B base.py / imagereward(): num_epochs
    "run.prompt_set": "single_prompt",  # V / B dgx.py imagereward(): prompt_fn
    "run.prompts": [UNICORN],
}

EXPECTED = {
    "sd15-ctrl-paper": {
        **COMMON,
        "algorithm.name": "ctrl",
        "algorithm.estimator": "ratio",  # PPO-clipped ratio, advantages V(x_{k+1}) - V(x_k)
        "algorithm.gae_lambda": 0.0,
        "algorithm.learning_rate": 5e-5,  # V train.learning_rate
        "algorithm.clip_range": 1.5e-5,  # V train.clip_range
        "algorithm.trajectories_per_step": 256,  # V train.batch_size 4 x gradient_accumulation_steps 16 x 4
        "run.num_samples": 512,  # V sample.batch_size 64 x num_batches_per_epoch 2 x 4 GPUs
        "value.use_reward_prior": True,  # V design: cos/sin blend with the value of the denoised image
        "value.updates_per_epoch": 1,  # V v_step
    },
    "sd15-ddpo-paper": {
        **COMMON,
        "algorithm.name": "ddpo",
        "algorithm.learning_rate": 3e-5,  # B dgx.py imagereward() train.learning_rate
        "algorithm.clip_range": 1e-5,  # B dgx.py imagereward() train.clip_range
        "algorithm.trajectories_per_step": 128,  # B dgx.py train.batch_size 4 x accumulation 8 x 4 GPUs
        "run.num_samples": 256,  # B dgx.py sample.batch_size 64 x num_batches_per_epoch 1 x 4 GPUs
        "algorithm.stat_buffer": 16,  # B dgx.py per_prompt_stat_tracking buffer_size
        "algorithm.stat_min_count": 16,  # B dgx.py per_prompt_stat_tracking min_count
    },
}
STEPS_PER_EPOCH = {"sd15-ctrl-paper": 2, "sd15-ddpo-paper": 2}  # both: 2 optimizer steps an epoch


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_preset_matches_the_authors_values(name):
    cfg = build_config(name)
    got = {key: _get(cfg, key) for key in EXPECTED[name]}
    assert got == EXPECTED[name]
    assert cfg.optimizer_steps_per_epoch == STEPS_PER_EPOCH[name]
    # on 4 data-parallel learners, as the authors ran it, the preset still validates
    build_config(name, overrides=["resources.num_learner_workers=4"])


def test_existing_presets_keep_one_step_per_micro_batch():
    for name, steps in {"sd15": 512, "sd15-random": 512, "tiny": 2, "toy-gmm": 16}.items():
        cfg = build_config(name)
        assert cfg.algorithm.trajectories_per_step is None and cfg.algorithm.weight_decay == 0.0
        assert cfg.optimizer_steps_per_epoch == steps, name


def test_dry_run_without_weights_prints_the_plan_and_where_to_put_them(monkeypatch, capsys, tmp_path):
    import scoreaction.weights_status as ws

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ws, "_hub_cached", lambda *a, **k: None)  # nothing in the Hugging Face cache
    rc = finetune.main(["--preset", "sd15-ctrl-paper", "--dry-run", "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0
    assert (
        "resource plan: preset sd15-ctrl-paper (model sd15), algorithm ctrl, 100 epochs x 512 samples" in out
    )
    assert "optimizer steps: 2 per epoch" in out
    assert f"MISSING model (model.name_or_path='{DEFAULT_SD15_ID}')" in out
    assert "--set model.name_or_path=DIR" in out
    assert "MISSING reward 'imagereward'" in out and "jobs/convert_reward_weights.py imagereward" in out
    assert "some weights are missing" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_dry_run_with_the_weights_in_place_says_found(monkeypatch, capsys, tmp_path):
    import scoreaction.weights_status as ws

    model = tmp_path / "sd15"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    ir = tmp_path / "imagereward"
    ir.mkdir()
    (ir / "ImageReward.safetensors").write_bytes(b"")
    (ir / "med_config.json").write_text("{}")
    tok = tmp_path / "bert"
    tok.mkdir()
    (tok / "vocab.txt").write_text("[PAD]\n")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ws, "_hub_cached", lambda *a, **k: None)
    rc = finetune.main(
        [
            "--preset",
            "sd15-ddpo-paper",
            "--dry-run",
            "--set",
            f"model.name_or_path={model}",
            "--set",
            f"reward.imagereward.weights={ir}",
            "--set",
            f"reward.imagereward.tokenizer={tok}",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "MISSING" not in out and "some weights are missing" not in out
    assert (
        "resource plan: preset sd15-ddpo-paper (model sd15), algorithm ddpo, 100 epochs x 256 samples" in out
    )
    assert out.count("  found") == 3


def test_the_plan_names_the_chosen_preset_and_its_model():
    """The paper presets run model.preset sd15: the plan says which preset the user chose and which model it
    runs; a preset that is its own model is named once."""
    from scoreaction.config import Config
    from scoreaction.distributed.plan import build_plan, format_plan, local_node

    def first_line(cfg):
        plan = build_plan(cfg)
        return format_plan(cfg, plan, [local_node(plan, 0)], "local", "/tmp/ckpt").splitlines()[0]

    assert first_line(build_config("sd15-ddpo-paper")).startswith(
        "resource plan: preset sd15-ddpo-paper (model sd15), algorithm ddpo,"
    )
    assert first_line(build_config("sd15-random")).startswith("resource plan: preset sd15-random, algorithm")
    assert first_line(build_config("tiny", overrides=["model.preset=sd15-random"])).startswith(
        "resource plan: preset tiny (model sd15-random),"
    )
    assert first_line(Config()).startswith("resource plan: preset tiny, algorithm ctrl,")  # no --preset
