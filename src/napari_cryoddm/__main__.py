"""`python -m napari_cryoddm` (also what `torchrun -m napari_cryoddm train …` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
