"""Built-in strategies, one file each. Importing this package registers them."""
from . import (  # noqa: F401
    cdpruner, dart, divprune, fastv, fastervlm, flowcut, keep_all, mmtok, pdrop, pooling, random, sparsevlm, visionzip,
    vispruner,
)
