"""`tiny` SD with the JPEG-compressibility reward: both algorithms raise the mean reward in a few epochs
(the preset's own hyper-parameters: 8 epochs x 32 samples x 20 steps; slow: about 3 minutes on 2 cores)."""

from __future__ import annotations

import pytest

from scoreaction.config import build_config
from scoreaction.trainer import Trainer


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ctrl", "ddpo"])
def test_jpeg_compressibility_rises_on_tiny(tiny_dir, tmp_path, algorithm):
    cfg = build_config(
        "tiny",
        overrides=[
            f"model.name_or_path={tiny_dir}",
            f"algorithm.name={algorithm}",
            f"run.output_dir={tmp_path}",
        ],
    )
    summary = Trainer(cfg).fit()
    curve = [e["rollout/reward_mean"] for e in summary["per_epoch"]]
    print(
        f"\n{algorithm} on tiny: rollout reward per epoch {curve}, final {summary['final']['reward_mean']:.4f}"
    )
    # Per-sample JPEG sizes vary with std ~0.06 kB, so a mean over 32 samples has a standard error ~0.011 kB:
    # the final evaluation (a fresh batch) must beat the first epoch by > 5 standard errors, and the last two
    # epochs must be above the first.
    assert summary["final"]["reward_mean"] - curve[0] > 0.06
    assert min(curve[-2:]) > curve[0]
