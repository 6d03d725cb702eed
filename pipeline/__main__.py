"""`python -m pipeline` is the `vidlens` command."""

import sys

from pipeline.cli import main

sys.exit(main())
