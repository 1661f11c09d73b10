"""One module per source; importing this package registers them all."""
from pipelines import coco, dense, derived, imagenet_groups, laion, paired  # noqa: F401
