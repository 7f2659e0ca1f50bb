"""The distributed layer on Ray: rollout and reward actors, a Ray Train learner, the driver.

Modules (import them directly; this package imports nothing heavy):
    plan          resource plan, fit check against a cluster, --dry-run text (no Ray)
    workers       RolloutWorker, RewardWorker, MetricsSink (plain classes, made actors by the driver)
    controller    EpochRunner: rollouts -> streaming rewards -> ObjectRefs, weight publishing
    ddp           gradient all-reduce hooks for the learner's data parallelism
    learner_loop  the Ray Train function: value and policy updates, checkpoints, restarts
    resume        training checkpoints (safetensors + JSON), atomic publish, resume checks
    reporter      progress bar, TensorBoard scalars, grids, summary.json on the driver
    driver        run_distributed(): actors + TorchTrainer.fit() + reporting
    faults        fault injection for tests and drills
"""
