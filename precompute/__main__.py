"""`python -m clipscope_explorer.precompute ...` is `clipscope-explorer precompute ...`."""

import sys

from clipscope_explorer.cli import main

sys.exit(main(["precompute", *sys.argv[1:]]))
