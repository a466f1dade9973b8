"""`python -m jaxchar ...` is the same as the `jaxchar` command."""

import sys

from jaxchar.cli import main

sys.exit(main())
