"""One module per source; importing this package registers them all."""
from pipelines import coco, dense_annotations, derived_pairs, imagenet_groups, laion, paired_folders  # noqa: F401
