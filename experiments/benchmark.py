"""``python -m experiments.benchmark``: jaxcam's benchmark, side by side with pytorch-grad-cam.

The harness is :mod:`jaxcam.benchmark` (also ``python -m jaxcam.benchmark``, so an
installed jaxcam can be benchmarked on the user's own hardware); its docstring lists
the sections, cells and flags. ``--smoke`` is the tiny configuration the tests run.
"""

import sys

from jaxcam.benchmark import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m experiments.benchmark"))
