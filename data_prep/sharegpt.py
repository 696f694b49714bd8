"""LLaMA-Factory ShareGPT export / import of built rows:

    python data_prep/sharegpt.py export --input pairs.jsonl --output llamafactory/pairs.json --name entropo_dpo
    python data_prep/sharegpt.py import --input pairs.json --output pairs.jsonl

Same as `entropo-data sharegpt-export` / `sharegpt-import`."""

import sys

from entropo_trl.data.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("export", "import"):
        sys.exit("usage: python data_prep/sharegpt.py {export,import} --input ... --output ...")
    sys.exit(main([f"sharegpt-{sys.argv[1]}", *sys.argv[2:]]))
