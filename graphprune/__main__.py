"""``python -m graphprune``: the same as the ``graphprune`` command."""
import sys

from .cli.app import main

sys.exit(main())
