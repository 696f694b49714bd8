"""Build verifier rows from trajectory pools: `python data_prep/build_verifier.py --input POOL.jsonl --output OUT`.

Same as `entropo-data verifier`; `--help` lists the options."""

import sys

from entropo_trl.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["verifier", *sys.argv[1:]]))
