"""Runs: what a user starts (the job, the nightly series, adaptive sampling, convergence studies, compare,
the offline reduce) and what they check first (validation, the run's identity).

May import every layer below: core, storage, pipeline, outputs and config.
"""
