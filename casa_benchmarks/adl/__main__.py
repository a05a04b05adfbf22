"""``python -m casa_benchmarks.adl run|generate|validate ...``"""

import sys

from casa_benchmarks.adl.cli import main

sys.exit(main())
