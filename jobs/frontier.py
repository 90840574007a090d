"""Entry point of the distributed job, for `python` and for `ray job submit`.

    python jobs/frontier.py --config configs/tiny.yaml
    ray job submit --working-dir . -- python jobs/frontier.py --config configs/tiny.yaml
"""

import sys

from limits_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
