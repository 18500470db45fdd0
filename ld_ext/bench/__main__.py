"""``python -m ld_ext.bench [--quick] [--device cuda] [--out DIR]``: the same as ``ld-ext bench``."""

import sys

from .cli import main

sys.exit(main())
