"""``python -m precision_suite`` is the ``precision-suite`` command."""

import sys

from .cli import main

sys.exit(main())
