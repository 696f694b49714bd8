"""Build kto rows from trajectory pools: `python data_prep/build_kto.py --input POOL.jsonl --output OUT`.

Same as `entropo-data kto`; `--help` lists the options."""

import sys

from entropo_trl.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["kto", *sys.argv[1:]]))
