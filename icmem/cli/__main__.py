"""`python -m icmem.cli ...`, as `icmem ...` (the campaign starts its background run this way)."""

import sys

from icmem.cli.main import main

sys.exit(main())
