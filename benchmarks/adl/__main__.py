"""``python -m benchmarks.adl run|generate|validate ...``"""

import sys

from benchmarks.adl.cli import main

sys.exit(main())
