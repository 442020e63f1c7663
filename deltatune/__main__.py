"""``python -m deltatune`` (and ``torchrun -m deltatune train ...``)."""

import sys

from deltatune.cli import main

sys.exit(main())
