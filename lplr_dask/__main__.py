"""``python -m lplr_dask``: the ``lplr`` command."""

import sys

from lplr_dask.cli import main

if __name__ == "__main__":
    sys.exit(main())
