"""``python -m moka_ext`` and ``torchrun -m moka_ext``: the ``moka`` command (moka_ext.finetune.cli).

An entry point only: ``import moka_ext`` never runs it, and the library never imports the
application."""
import sys

from .finetune.cli import main

sys.exit(main())
