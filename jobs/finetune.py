"""scoreaction's main job: fine-tune a diffusion model with CTRL (score as action) or DDPO on Ray.

    python jobs/finetune.py [--preset NAME] [--config FILE.yaml] [--set dotted.key=value ...]
                            [--output-dir DIR] [--resume] [--dry-run] [--single-process] [--print-config]
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/finetune.py --output-dir /shared/run

Connects to the Ray cluster in RAY_ADDRESS when set (as under `ray job submit`), else starts a local Ray.
Rollout actors sample, reward actors score each batch as it lands, a Ray Train learner updates the value
function and the policy and publishes the new weights (see scoreaction/distributed/). Writes
DIR/summary.json, DIR/reward_curve.png, DIR/tensorboard/, sample grids under DIR/samples/ and checkpoints
under DIR/checkpoints/ (or run.storage_path). --resume continues the run in DIR from its last checkpoint;
--dry-run prints the resource plan for the cluster it sees and exits; --single-process runs the reference
loop in this process without Ray; --print-config prints the effective configuration as YAML and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoreaction.config import PRESETS, Config, ConfigError, build_config  # noqa: E402
from scoreaction.config.help import config_help, config_yaml  # noqa: E402
from scoreaction.distributed.plan import (  # noqa: E402
    PlanError,
    build_plan,
    check_fit,
    format_plan,
    local_cpus,
    local_node,
    nodes_from_ray,
    validate_layout,
)
from scoreaction.run_folder import ResumeError  # noqa: E402


class ConnectError(RuntimeError):
    """RAY_ADDRESS names no reachable Ray cluster."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny", help=f"config preset: {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--config", default=None, help="YAML file merged over the preset")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, value parsed as YAML, e.g. --set sampler.num_steps=20 (repeatable)",
    )
    p.add_argument(
        "--output-dir", default=None, help="run folder (default: run.output_dir); absolute under a job"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint"
    )
    p.add_argument("--dry-run", action="store_true", help="print the resource plan for the cluster and exit")
    p.add_argument(
        "--single-process", action="store_true", help="run the reference loop in this process, no Ray"
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and Ray Train's own log lines on the console (default: they go to DIR/ray.log)",
    )
    p.add_argument(
        "--no-before-after",
        action="store_true",
        help="skip the before/after grid (base vs final checkpoint, DIR/samples/before_after.png) at the end",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration (preset + --config + --set + --output-dir) as YAML and exit; "
        "--config of that file gives the same configuration",
    )
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Ray connection (jobs/ is the only place that calls ray.init)
# --------------------------------------------------------------------------------------------------


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a clear message, when RAY_ADDRESS cannot be reached (ray.init would retry a while)."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise ConnectError(
            f"RAY_ADDRESS={address!r} is a dashboard (job API) address; jobs/finetune.py connects to the "
            "cluster itself (host:6379 or ray://host:10001). Submit with `ray job submit --address "
            f"{address} -- python jobs/finetune.py ...`, or unset RAY_ADDRESS to start a local Ray."
        )
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectError(f"RAY_ADDRESS={address!r} is not host:port, ray://host:port, auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectError(
            f"RAY_ADDRESS={address!r}: no Ray cluster is reachable there ({exc}). Start one with "
            "`ray start --head`, fix the address, or unset RAY_ADDRESS to run on a local Ray."
        ) from None


RAY_LOG = "ray.log"
RAY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data", "ray.serve", "py.warnings")


def quiet_ray_logs(out: Path) -> logging.Handler:
    """Send the driver's Ray loggers (and Python warnings) to out/ray.log instead of the console; returns the
    handler, for restore_ray_logs."""
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / RAY_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    for name in RAY_LOGGERS:
        log = logging.getLogger(name)
        log.handlers = [h for h in log.handlers if not isinstance(h, logging.StreamHandler)] + [handler]
        log.propagate = False
    return handler


def copy_worker_logs(out: Path) -> None:
    """Append the local Ray session's worker logs (the actors' stdout/stderr: Ray Train's "Reporting training
    result" lines, warnings) to out/ray.log, since log_to_driver=False keeps them off the console."""
    try:
        from ray._private.worker import _global_node  # the session folder has no public accessor

        logs = Path(_global_node.get_logs_dir_path())
    except Exception:  # a remote cluster, or a Ray without it: the logs stay in the session folder
        return
    with open(out / RAY_LOG, "a") as dst:
        for f in sorted(logs.glob("worker-*.*")):
            text = f.read_text(errors="replace").strip() if f.stat().st_size else ""
            if text:
                dst.write(f"\n==> {f.name} <==\n{text}\n")


def connect(cfg: Config, verbose: bool = True) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray sized for the plan; True when this call started Ray.
    verbose=False: the actors' output stays in Ray's session logs instead of streaming to this console."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": verbose}
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as exc:
            raise ConnectError(f"RAY_ADDRESS={address!r}: could not connect ({exc})") from None
        return True
    ray.init(address="local", num_cpus=local_cpus(build_plan(cfg)), **quiet)
    return True


def cluster_nodes(cfg: Config) -> tuple[list, str]:
    """The nodes the run would use, without starting anything locally."""
    if os.environ.get("RAY_ADDRESS"):
        import ray

        started = connect(cfg)
        try:
            return nodes_from_ray(ray.nodes()), f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
        finally:
            if started:
                ray.shutdown()
    import torch

    return [local_node(build_plan(cfg), torch.cuda.device_count())], "a local Ray (not started by --dry-run)"


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def run_single_process(cfg: Config, out: Path, resume: bool = False) -> dict:
    """The epoch loop in this process (no Ray): the in-process backend, same files, same checkpoints."""
    from scoreaction.faults import FaultPlan
    from scoreaction.trainer import Trainer

    return Trainer(cfg, out, faults=FaultPlan.from_env()).fit(resume=resume, progress_bar=True)


def run(cfg: Config, out: Path, resume: bool, verbose: bool = True) -> dict:
    """The Ray run: every check that needs no cluster first (nothing started, nothing written), then Ray.
    verbose=False: Ray's own log lines go to out/ray.log (see quiet_ray_logs, copy_worker_logs)."""
    import torch

    from scoreaction.distributed.driver import one_host_threads, preflight, run_distributed

    local = not os.environ.get("RAY_ADDRESS")
    preflight(cfg, out, resume, [local_node(build_plan(cfg), torch.cuda.device_count())] if local else None)
    if not local:
        check_reachable(os.environ["RAY_ADDRESS"])  # fail before ray.log is created: nothing written
    if not verbose:
        quiet_ray_logs(out)
    started = connect(cfg, verbose)
    try:
        # one host: the actors that run at the same time split its cores (driver.one_host_threads)
        threads = cfg.resources.torch_threads or (
            one_host_threads(cfg, os.cpu_count() or 1) if local and started else None
        )
        return run_distributed(cfg, out, resume=resume, threads=threads)
    finally:
        if started:
            import ray

            if not verbose:
                copy_worker_logs(out)
            ray.shutdown()


def add_before_after(cfg: Config, out: Path, summary: dict) -> dict:
    """The before/after grid of an image run (base vs the final checkpoint, same seeds) as
    out/samples/before_after.png; for digits, the held-out classifier's accuracy of each. Stored in
    summary['before_after'] and summary.json."""
    import json

    from scoreaction.before_after import BEFORE_AFTER_FILE, before_after
    from scoreaction.checkpoint import latest_in
    from scoreaction.run_folder import checkpoint_dir_for

    ckpt = latest_in(checkpoint_dir_for(cfg, out))
    if ckpt is None:
        return summary
    summary["before_after"] = before_after(cfg, ckpt, out / "samples" / BEFORE_AFTER_FILE)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the console: one progress bar and the closing summary, unless --verbose
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for lib in (diffusers_logging, transformers_logging):  # their load bars and notices
            lib.disable_progress_bar()
            lib.set_verbosity_error()
    try:
        # --output-dir is a path, taken literally (never YAML: "/data/run #2" is not "/data/run")
        values = {"run.output_dir": args.output_dir} if args.output_dir else None
        cfg = build_config(args.preset, args.config, args.overrides, values)
        if args.print_config:  # before anything is checked, started or written
            print(config_yaml(cfg, args.preset), end="")
            return 0
        out = Path(cfg.run.output_dir).expanduser().resolve()
        if args.dry_run:
            from scoreaction.distributed.driver import checkpoint_dir_for

            validate_layout(cfg)
            nodes, where = cluster_nodes(cfg)
            text = format_plan(cfg, build_plan(cfg), nodes, where, str(checkpoint_dir_for(cfg, out)))
            print(text)
            alg = cfg.algorithm
            print(
                f"optimizer steps: {cfg.optimizer_steps_per_epoch} per epoch ({alg.updates_per_epoch} pass(es) x "
                f"{cfg.run.num_samples} samples / {alg.trajectories_per_step or alg.micro_batch_size} trajectories "
                f"per step, micro-batches of {alg.micro_batch_size})"
            )
            from scoreaction.weights_status import weights_report

            report, complete = weights_report(cfg)
            print(report)
            if not complete:
                print("some weights are missing here: put them where the lines above say before a run")
            check_fit(build_plan(cfg), nodes)
            return 0
        if args.single_process:
            summary = run_single_process(cfg, out, args.resume)
        else:
            summary = run(cfg, out, args.resume, args.verbose)
        if cfg.model.preset != "toy-gmm" and not args.no_before_after:
            summary = add_before_after(cfg, out, summary)
    except (ConfigError, PlanError, ResumeError, ConnectError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a failed run (e.g. the learner failed more than max_learner_failures times)
        logging.getLogger("finetune").exception("the run failed")
        print(f"error: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    final = summary["final"]
    ba = summary.get("before_after") or {}
    held = (
        f", held-out classifier accuracy base {ba['base']['accuracy_heldout']:.0%} -> tuned "
        f"{ba['tuned']['accuracy_heldout']:.0%}"
        if "base" in ba
        else ""
    )
    print(
        f"{summary['algorithm']} on {summary['preset']}: {summary['epochs']} epochs, {summary['samples']} samples, "
        f"final reward {final['reward_mean']:.4g}, KL {final['kl_mean']:.3g}, objective {final['objective']:.4g}{held}\n"
        f"run folder: {out} (summary.json, reward_curve.png, checkpoints/"
        + (", samples/before_after.png" if ba else "")
        + (")" if args.verbose or args.single_process else f", {RAY_LOG})")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
