"""``python -m megatie``: the ``megatie`` command (export, eval, generate)."""

import sys

from megatie.command import main

sys.exit(main())
