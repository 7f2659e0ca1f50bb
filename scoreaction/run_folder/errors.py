"""The errors of a run folder: it cannot be started or resumed, another job owns it, or a checkpoint would
hold non-finite values."""

from __future__ import annotations

from scoreaction.checkpoint import CheckpointError


class ResumeError(ValueError):
    """A run cannot be started or resumed in this folder (checkpoints of another run, an incompatible
    config, nothing to resume from)."""


class RunLockedError(ResumeError):
    """Another live job owns the run folder."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint was refused because some of its tensors are NaN or infinite."""
