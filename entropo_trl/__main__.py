"""`python -m entropo_trl COMMAND ...` is the `entropo` command."""

import sys

from .cli import main

sys.exit(main())
