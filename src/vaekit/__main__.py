"""Allows `python -m vaekit`."""

import sys

from .stopping import main

sys.exit(main())
