"""Storage: locations (local or object store), the sample store, buckets, sample I/O and reading results.

Imports :mod:`limits_ray.core` and pyarrow; no Ray, vLLM or torch.
"""
