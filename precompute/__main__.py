import sys

from clipscope_explorer.precompute.cli import main

sys.exit(main())
