"""Build sft rows from trajectory pools: `python data_prep/build_sft.py --input POOL.jsonl --output OUT`.

Same as `entropo-data sft`; `--help` lists the options."""

import sys

from entropo_trl.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
