"""python -m captiond"""

import sys

from .cli import main

sys.exit(main())
