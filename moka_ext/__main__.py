"""``python -m moka_ext`` and ``torchrun -m moka_ext``: the ``moka`` command."""
import sys

from .cli import main

sys.exit(main())
