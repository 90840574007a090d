"""The Ray Data pipeline: prompts, vLLM generation, reward scoring, engine placement, faults, progress,
per-bucket tasks and cluster helpers.

Imports :mod:`limits_ray.core`, :mod:`limits_ray.storage` and :mod:`limits_ray.config`.
"""
