"""``python -m serve.cli``: the ``loopchat`` command without the console script (how
``loopchat up`` starts its worker child with the same interpreter)."""

import sys

from serve.cli import main

sys.exit(main())
