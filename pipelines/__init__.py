"""One module per source; importing this package registers them all."""
from uvd.pipelines import annotated_video, coco, dense_annotations, derived_pairs, imagenet_groups, laion, objaverse, paired_folders, semantic_folders, video  # noqa: F401
from uvd.pipelines import incontext_caption, incontext_segmentation  # noqa: F401  (sentences with text)
