"""``python -m lopt``: the ``lopt`` command, also what ``torchrun ... -m lopt train`` starts on each rank."""

import sys

from lopt.cli import main

sys.exit(main())
