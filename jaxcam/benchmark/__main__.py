"""``python -m jaxcam.benchmark``: see :mod:`jaxcam.benchmark`."""

import sys

from jaxcam.benchmark import main

sys.exit(main())
