"""``python -m kmipd`` is the ``kmipd`` command."""

import sys

from kmipd.cli import main

sys.exit(main())
