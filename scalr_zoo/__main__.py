"""``python -m scalr_zoo``: the scalr-zoo command line."""

import sys

from .cli import main

sys.exit(main())
