"""``python -m gateway`` is the same CLI as ``gateway``."""

import sys

from gateway.cli import main

sys.exit(main())
