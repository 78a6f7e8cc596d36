"""`python -m dnnr_jax` is the `dnnr` command."""

import sys

from dnnr_jax.cli import main

sys.exit(main())
