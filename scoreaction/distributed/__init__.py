"""The Ray backend of the epoch loop: rollout and reward actors, a Ray Train learner, the driver.

The loop itself is ``scoreaction.loop`` (shared with the in-process backend); this package adds only what
Ray needs. Modules (import them directly; this package imports nothing heavy):
    plan           resource plan, fit check against a cluster, --dry-run text (no Ray)
    actors         RolloutWorker, RewardWorker, EventSink (plain classes, made actors by the driver)
    rollouts       RayRollouts: rollout batches on the actors, scoring overlapped, weight publishing
    learner_group  the Ray Train function: each rank runs the epoch loop; checkpoints registered, restarts
    driver         run_distributed(): actors + TorchTrainer.fit() + the reporter
"""
