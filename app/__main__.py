"""``python -m app``: the same as the ``poolkeeper`` command."""

import sys

from .cli import main

sys.exit(main())
