"""One α experiment: `python recipes/experiment.py --config recipes/experiments/MODEL.yaml --alpha 0.11`.

The same as `entropo experiment`; the W&B sweeps in `recipes/sweeps/` run it. `--help` lists the options."""

import sys

from entropo_trl.experiment import main

if __name__ == "__main__":
    sys.exit(main())
