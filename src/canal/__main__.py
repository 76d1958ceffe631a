"""``python -m canal`` (also under ``torchrun``)."""

import sys

from canal.cli import main

sys.exit(main())
