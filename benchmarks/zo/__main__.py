"""``python -m benchmarks.zo``: the same as ``python -m benchmarks.zo.run``."""

import sys

from benchmarks.zo.run import main

sys.exit(main())
