"""`python -m modeling_transfusion.conversion`: the `transfusion-convert` command line."""

import sys

from .cli import main

sys.exit(main())
