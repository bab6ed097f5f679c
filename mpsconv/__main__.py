"""``python -m mpsconv``: the ``mpsconv`` command."""
import sys

from .cli import main

sys.exit(main())
