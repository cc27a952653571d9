"""``python -m bench``: runs the whole benchmark (see ``bench.cli``)."""

import sys

from bench.cli import main

sys.exit(main())
