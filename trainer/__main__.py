"""``python -m trainer``: the same as ``python -m trainer.run``."""

import sys

from trainer.run import main

sys.exit(main())
