"""``python -m dt_sdk.train`` and ``accelerate launch -m dt_sdk.train``: ``dt train`` without ``dt``."""

import sys

from .cli import main

sys.exit(main())
