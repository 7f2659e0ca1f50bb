"""Suite `algorithms`: sample efficiency of CTRL against DDPO on identical work.

Same model, sampler, samples per epoch, epochs and seeds; only `algorithm.name` differs. Two problems:
`toy-gmm` (the curve is the rollout objective E[r] - kl_coef KL against J*) and `tiny` with JPEG
compressibility (the curve is the rollout reward). For each, the curves averaged over 3 seeds go to a PNG
(outputs/benchmark/algorithms_<problem>.png) and the table reports, per algorithm, the trajectories it
needed to reach a common target (90% of the way from the first-epoch value to the lower of the two final
values). Reward queries are counted too: CTRL's reward prior scores x0_hat at every step.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.common import Result, result
from scoreaction.config import build_config
from scoreaction.trainer import Trainer

SEEDS = (0, 1, 2)
OUT = Path("outputs/benchmark")
PROBLEMS = {
    "toy-gmm": (
        "toy-gmm",
        ["run.epochs=30", "algorithm.micro_batch_size=256", "algorithm.learning_rate=3e-3"],
        "rollout/objective",
    ),
    "tiny-jpeg": ("tiny", [], "rollout/reward_mean"),
}
COLORS = {"ctrl": "blue", "ddpo": "red"}


def _curve(preset: str, overrides: list[str], key: str, algorithm: str, seed: int) -> list[dict]:
    cfg = build_config(
        preset,
        overrides=[
            *overrides,
            f"algorithm.name={algorithm}",
            f"run.seed={seed}",
            f"run.output_dir={OUT / 'runs' / f'{preset}-{algorithm}-{seed}'}",
        ],
    )
    trainer = Trainer(cfg)
    curve = []
    for epoch in range(cfg.run.epochs):
        m = trainer.epoch(epoch)
        curve.append({"samples": m["samples"], "queries": m["reward_queries"], "value": m[key]})
    return curve


def _mean_curve(curves: list[list[dict]]) -> list[dict]:
    return [
        {k: statistics.fmean(c[i][k] for c in curves) for k in ("samples", "queries", "value")}
        for i in range(len(curves[0]))
    ]


def _first_reaching(curve: list[dict], target: float, rising: bool) -> dict | None:
    for point in curve:
        if (point["value"] >= target) if rising else (point["value"] <= target):
            return point
    return None


def _plot(curves: dict[str, list[dict]], title: str, path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 720, 420, 60
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    xs = [p["samples"] for c in curves.values() for p in c]
    ys = [p["value"] for c in curves.values() for p in c]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad), h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    for i, (name, curve) in enumerate(curves.items()):
        pts = [px(p["samples"], p["value"]) for p in curve]
        draw.line(pts, fill=COLORS.get(name, "black"), width=2)
        draw.text(
            (w - pad - 120, pad + 10 + 15 * i), f"{name} (mean of {len(SEEDS)} seeds)", fill=COLORS[name]
        )
    draw.text((pad, 20), f"{title}: {y0:.4g} .. {y1:.4g}", fill="black")
    draw.text((pad, h - pad + 15), f"trajectories sampled {x0:.0f} .. {x1:.0f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def run(repeats: int) -> list[Result]:
    results = []
    for problem, (preset, overrides, key) in PROBLEMS.items():
        mean = {
            alg: _mean_curve([_curve(preset, overrides, key, alg, seed) for seed in SEEDS])
            for alg in ("ctrl", "ddpo")
        }
        _plot(mean, f"{problem}: {key} vs trajectories", OUT / f"algorithms_{problem}.png")
        # Higher is better on both problems. The target is 90% of the way to the lower final value when both
        # improved, else to the final of the one that did (the other is reported as never reaching it).
        start = statistics.fmean(c[0]["value"] for c in mean.values())
        finals = [c[-1]["value"] for c in mean.values()]
        final = min(finals) if min(finals) > start else max(finals)
        target = start + 0.9 * (final - start)
        reached = {alg: _first_reaching(c, target, True) for alg, c in mean.items()}
        for alg, c in mean.items():
            results.append(
                result(
                    f"algorithms/{problem}/{alg}/final_{key}",
                    c[-1]["value"],
                    "value",
                    c[0]["value"],
                    "report",
                )
            )
        for alg, point in reached.items():
            if point is None:
                results.append(
                    result(
                        f"algorithms/{problem}/trajectories_to_{target:.4g}/{alg}_never_reached",
                        float("nan"),
                        "traj",
                        mean[alg][-1]["samples"],
                        "report",
                    )
                )
        if all(reached.values()):
            ctrl, ddpo = reached["ctrl"], reached["ddpo"]
            results.append(
                result(
                    f"algorithms/{problem}/trajectories_to_{target:.4g}/ctrl_vs_ddpo",
                    ctrl["samples"],
                    "traj",
                    ddpo["samples"],
                    "<= 0.5",
                )
            )
            results.append(
                result(
                    f"algorithms/{problem}/reward_queries_to_{target:.4g}/ctrl_vs_ddpo",
                    ctrl["queries"],
                    "queries",
                    ddpo["queries"],
                    "report",
                )
            )
    return results
