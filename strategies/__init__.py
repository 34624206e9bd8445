"""Built-in strategies, one file each. Importing this package registers them."""
from . import fastv, flowcut, keep_all, pdrop, pooling, random, sparsevlm  # noqa: F401
