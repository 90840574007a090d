"""Policies against the frontier in one command (``limits-ray compare``), for `python` and `ray job submit`.

    python jobs/policy.py --config configs/tiny_policies.yaml
    python jobs/policy.py --config my_policies.yaml --blend runs/blend_02=runs/tiny-models/policy,runs/tiny-models/policy_b,0.2

``--blend OUT=BASE,OTHER,WEIGHT`` (repeatable) first saves the weight blend ``(1-w) BASE + w OTHER`` to
OUT unless it exists (a stand-in for a mildly aligned checkpoint; ``make-tiny-models`` already builds
the tiny configs' ``policy_blend``); every other flag goes to compare.
"""

import argparse
import sys

from limits_ray import blend_checkpoint
from limits_ray.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--blend", action="append", default=[])
    known, rest = parser.parse_known_args()
    for spec in known.blend:
        out, _, sources = spec.partition("=")
        base, other, weight = sources.split(",")
        print(f"blend {blend_checkpoint(base, other, float(weight), out)}")
    sys.exit(main(["compare", *rest]))
