"""The pure core: statistics of the KL-reward frontier in numpy, scipy and pyarrow alone.

No Ray, vLLM, torch, transformers, YAML or matplotlib is imported below this package (enforced by
``tests/test_architecture.py``), so every estimator can be used and tested without a cluster.
"""
