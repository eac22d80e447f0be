"""``python -m dt_sdk new NAME --carrier kv``: the ``dt new`` command without the host CLI."""

import sys

from .cli import main

sys.exit(main())
