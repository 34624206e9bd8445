"""Built-in strategies, one file each. Importing this package registers them."""
from . import dart, divprune, fastv, fastervlm, flowcut, keep_all, pdrop, pooling, random, sparsevlm, visionzip  # noqa: F401
