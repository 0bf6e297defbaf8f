"""`python -m jaxcam` is the `jaxcam` command line."""

import sys

from jaxcam.cli import main

sys.exit(main())
