"""limits-ray: the KL-reward Pareto frontier of language-model alignment, from base-model samples.

The statistics core (:mod:`limits_ray.core.tilt`, :mod:`limits_ray.core.bon`, :mod:`limits_ray.core.dyadic`,
:mod:`limits_ray.core.frontier`) is pure numpy; the pipeline modules wire Ray Data and vLLM around it.
"""

__version__ = "0.1.0"
