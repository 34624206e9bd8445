"""Built-in strategies, one file each. Importing this package registers them."""
from . import flowcut, keep_all, pooling, random  # noqa: F401
