"""One module per source; importing this package registers them all."""
from pipelines import imagenet_groups, laion  # noqa: F401
