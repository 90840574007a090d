"""Outputs: figures, the Markdown reports, the store status and numbers printed for people.

Imports :mod:`limits_ray.core` and :mod:`limits_ray.storage` (and matplotlib); never the pipeline or runs.
"""
