"""Measurement: how much of the detection boxes' color survives the tokenizer, for the old drawing
(outline only, max(2, side/160) px) and the current one (`pipelines.render.render_detection`:
max(3, side/40) px outline + a translucent category tint inside).

    .venv/bin/python bench/boxes.py [--weights tokenizer/weights/demo-small] [--images 12]

Photos from the demo world (skimage), 3 random boxes each with random COCO categories, drawn at
the photo's size and resized to 256x256 as a run does; then encoded and decoded. Reported:
- color kept: of the change the drawing made to the 256x256 pixels, the share that the
  reconstruction keeps (projection of decoded(drawn) - decoded(plain) onto drawn - plain);
- color direction: for each box, the cosine between the decoded change inside the box (mean RGB
  of decoded(drawn) - decoded(plain)) and the change its category color asks for (color - the
  decoded photo's mean there): 1 = the category's hue comes through, 0 = unrelated; and how
  many boxes reach 0.8. (80 golden-ratio hues are too close to tell apart one by one.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/: bench/tokenize.py would shadow the stdlib

import numpy as np  # noqa: E402

from uvd.demo.world import _available_photos, _load_photo  # noqa: E402
from uvd.pipelines import render  # noqa: E402
from uvd.images import resize_array  # noqa: E402
from uvd.recipe import recipe_from_dict  # noqa: E402

COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # the 80 used ids


def old_drawing(image, boxes):
    return render.render_detection(image, boxes, thickness=max(2, round(max(image.shape[:2]) / 160)), tint=0)


def new_drawing(image, boxes):
    return render.render_detection(image, boxes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(Path(__file__).resolve().parents[1] / "tokenizer/weights/demo-small"))
    parser.add_argument("--images", type=int, default=12)
    args = parser.parse_args()
    from uvd.tokenizer.encode import ImageTokenizer

    tok = ImageTokenizer(None, weights=args.weights, device="cpu")
    recipe = recipe_from_dict({"source": "laion", "inputs": "unused", "filters": {"min_side": 0, "max_aspect": 0}})
    rng = np.random.default_rng(0)
    photos = [_load_photo(name) for name in _available_photos()]
    colors = {c: np.asarray(render.category_color(c), np.float32) for c in COCO_IDS}
    stats = {"old": [[], []], "new": [[], []]}  # color kept per image, cosine per box
    for i in range(args.images):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        boxes = []
        for _ in range(3):
            bw, bh = rng.uniform(0.2, 0.5) * w, rng.uniform(0.2, 0.5) * h
            boxes.append(([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh], int(rng.choice(COCO_IDS))))
        plain = resize_array(photo, recipe.image, recipe.filters)[0]
        for name, draw in (("old", old_drawing), ("new", new_drawing)):
            drawn = resize_array(draw(photo, boxes), recipe.image, recipe.filters)[0]
            rec_plain, rec_drawn = tok.decode_tokens(tok.encode_pixels(np.stack([plain, drawn])))
            change = drawn.astype(np.float32) - plain
            kept = rec_drawn.astype(np.float32) - rec_plain
            mask = np.abs(change).sum(-1) > 30
            stats[name][0].append(float((kept[mask] * change[mask]).sum() / max((change[mask] ** 2).sum(), 1)))
            # Each box in 256x256 coordinates (center crop of the shorter side to 256).
            scale = 256 / min(h, w)
            ox, oy = (w * scale - 256) / 2, (h * scale - 256) / 2
            for (bx, by, bw, bh), category in boxes:
                x0, y0 = int(max(0, bx * scale - ox)), int(max(0, by * scale - oy))
                x1, y1 = int(min(256, (bx + bw) * scale - ox)), int(min(256, (by + bh) * scale - oy))
                if x1 - x0 < 4 or y1 - y0 < 4:
                    continue  # cropped away
                delta = kept[y0:y1, x0:x1].reshape(-1, 3).mean(0)
                base = rec_plain[y0:y1, x0:x1].reshape(-1, 3).astype(np.float32).mean(0)
                want = colors[category] - base
                stats[name][1].append(float(np.dot(delta, want) / (np.linalg.norm(delta) * np.linalg.norm(want) + 1e-6)))
    print(f"tokenizer {tok.info['id']} ({args.weights}); {args.images} photos, 3 boxes each, 256x256")
    for name, label in (("old", "outline max(2, side/160) px, no tint"), ("new", "outline max(3, side/40) px + 35% tint")):
        kept, cosines = stats[name]
        print(f"{label:40s}: color kept {np.median(kept):6.1%} (median; {min(kept):.1%}-{max(kept):.1%}); "
              f"color direction cosine {np.median(cosines):.2f} (median), >= 0.8 for "
              f"{sum(c >= 0.8 for c in cosines)}/{len(cosines)} boxes")


if __name__ == "__main__":
    main()
