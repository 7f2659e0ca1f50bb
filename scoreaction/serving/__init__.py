"""Serving: what the image service (serve/) runs, without Ray.

- ``api``: the HTTP request and response models and their bounds (pydantic; no torch).
- ``catalog``: model ids (``base``, a run, ``RUN@step_NNNNNN``) and the listing of a checkpoint root.
- ``spec``: one generation request, its cost limits and its cancellation token.
- ``generate``: ``ImageGenerator``, the base model plus loaded checkpoints, deterministic batched sampling
  with the training sampler's step.
- ``model_cache``: a replica's LRU of loaded models, pinned while in use.

This package never imports serve/ or jobs/.
"""
