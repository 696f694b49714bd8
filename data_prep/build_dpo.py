"""Build dpo rows from trajectory pools: `python data_prep/build_dpo.py --input POOL.jsonl --output OUT`.

Same as `entropo-data dpo`; `--help` lists the options."""

import sys

from entropo_trl.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
