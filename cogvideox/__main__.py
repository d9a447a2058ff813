"""``python -m cogvideox ...``: the same as the ``cogvideox`` console script."""

import sys

from .cli import main

sys.exit(main())
