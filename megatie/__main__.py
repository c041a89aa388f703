"""``python -m megatie``: the ``megatie`` command (export, eval, generate)."""

import sys

from megatie.tools.command import main

sys.exit(main())
