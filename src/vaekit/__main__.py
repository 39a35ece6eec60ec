"""Allows `python -m vaekit`."""

import sys

from .cli import main

sys.exit(main())
