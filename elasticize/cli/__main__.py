"""``python -m elasticize.cli``: the command line, like ``python -m elasticize``."""

import sys

from . import main

sys.exit(main())
