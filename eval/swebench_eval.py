"""`python eval/swebench_eval.py ARGS` is `entropo swebench ARGS` (`--help` lists the options).

Python puts this folder first on the module path when it runs a script from here, and `eval/select.py` would then
stand in for the standard library's `select` module (used by subprocess and asyncio). So the script only hands over
to the package's command in a fresh interpreter, before anything imports `select` (with `-P` where Python has it, so
that a run from inside eval/ does not put this folder back on the path)."""

import os
import sys

if __name__ == "__main__":
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    os.execv(sys.executable, [sys.executable, *safe_path, "-m", "entropo_trl", "swebench", *sys.argv[1:]])
