"""Sentences with text: the one id space and its layout, the two in-context sources (plain lists and a
real Ray run), and the trainer side (vocabulary, loader, a forward pass, `uvd eval`'s in-context scores)."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import TEST_OVERRIDES
from uvd.pipelines import text as T
from plain_run import run_plain
from uvd.records import ImageRecord, Sentence
from uvd.recipe import load_recipe

RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    """A tiny byte-level BPE, trained here and saved as tokenizer.json (as a user brings GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a photo of a dog at the beach", "person at [1, 2, 3, 4]", "a red ball"] * 20, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path, tok


@pytest.fixture(scope="module")
def laion_world(tmp_path_factory):
    from uvd.demo.world import build_laion_world

    return build_laion_world(tmp_path_factory.mktemp("laion") / "laion", num_shards=1, images_per_shard=24, seed=3)


@pytest.fixture(scope="module")
def coco_world(tmp_path_factory):
    from uvd.demo.world_annotated import build_coco_world

    return build_coco_world(tmp_path_factory.mktemp("coco") / "coco", seed=1)


def _recipe(name, inputs, tokenizer_path, *extra):
    return load_recipe(RECIPES / f"{name}.yaml", [f"inputs={inputs}", f"sentence.text_tokenizer={tokenizer_path}",
                                                  *TEST_OVERRIDES, "limits.max_reject_rate=0.95", *extra])


def _record(key, value):
    return ImageRecord(key, np.full(256, value, np.uint16), "d", 10, 10, {})


def test_text_ids_are_offset_and_the_layout_splits_the_row(text_tokenizer):
    path, tok = text_tokenizer
    tokenizer = T.load_text_tokenizer(str(path), T.file_sha256(str(path)))
    ids = tokenizer.encode("a photo of a dog")
    assert ids.dtype == np.uint16 and ids.min() >= T.TEXT_OFFSET
    assert tok.decode((ids.astype(np.int64) - T.TEXT_OFFSET).tolist()) == "a photo of a dog"
    images = [_record("a", 1), _record("b", 2)]
    row = T.TextSentence("incontext_caption", images, meta={}, segments=[("image", 0), ("text", ids), ("image", 1)]).to_row("s")
    meta = json.loads(row["meta"])
    assert meta["layout"] == [["image", 256], ["text", len(ids)], ["image", 256]]
    parts = T.split_layout(row["tokens"], meta["layout"])
    assert [k for k, _ in parts] == ["image", "text", "image"]
    assert (parts[0][1] == 1).all() and (parts[2][1] == 2).all() and (parts[1][1] == ids).all()
    # Without text, the row is exactly the plain sentence's but for the layout.
    plain = Sentence("single", images[:1], meta={"x": 1}).to_row("s")
    mixed = T.TextSentence("single", images[:1], meta={"x": 1}, segments=[("image", 0)]).to_row("s")
    assert plain["id"] == mixed["id"] and (plain["tokens"] == mixed["tokens"]).all()
    assert {k: v for k, v in json.loads(mixed["meta"]).items() if k != "layout"} == json.loads(plain["meta"])


def test_tokenizer_identity_is_in_the_recipe_hash_and_pinned(text_tokenizer, laion_world, tmp_path):
    path, _ = text_tokenizer
    rec = _recipe("incontext_caption", laion_world["path"], path)
    assert rec.sentence.text_tokenizer_sha256 == T.file_sha256(str(path))
    other = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"]["vocab"]["zzzz"] = max(data["model"]["vocab"].values()) + 1
    other.write_text(json.dumps(data))
    assert _recipe("incontext_caption", laion_world["path"], other).hash() != rec.hash()
    with pytest.raises(ValueError, match="sentence.text_tokenizer_sha256"):
        _recipe("incontext_caption", laion_world["path"], other, f"sentence.text_tokenizer_sha256={rec.sentence.text_tokenizer_sha256}")
    with pytest.raises(ValueError, match="sentence.text_tokenizer"):
        load_recipe(RECIPES / "incontext_caption.yaml", [f"inputs={laion_world['path']}", "sentence.text_tokenizer="])


def test_caption_sentences_carry_each_image_caption(text_tokenizer, laion_world):
    path, tok = text_tokenizer
    rec = _recipe("incontext_caption", laion_world["path"], path, "sentence.examples=2")
    sentences, rejects, items, _ = run_plain(rec)
    captions = {it.key: it.meta.get("caption") for it in items if not it.reject}
    assert sentences and all(len(s.images) == 3 for s in sentences)
    for s in sentences:
        row = s.to_row("incontext_caption")
        parts = T.split_layout(row["tokens"], json.loads(row["meta"])["layout"])
        assert [k for k, _ in parts] == ["image", "text"] * 3
        for image, (_, ids) in zip(s.images, parts[1::2]):
            assert tok.decode((ids.astype(np.int64) - T.TEXT_OFFSET).tolist()) == captions[image.key].strip()
    used = {im.key for s in sentences for im in s.images}
    rejected = Counter(r.key for r in rejects)
    assert all(n == 1 for n in rejected.values()) and not used & set(rejected)
    assert used | set(rejected) == {it.key for it in items}  # every item: in a sentence or rejected, once
    assert len(used) % 3 == 0 and Counter(r.reason for r in rejects)["unused_remainder"] < 3


def test_coco_captions_every_image_accounted_for(text_tokenizer, coco_world, tmp_path):
    import shutil

    path, tok = text_tokenizer
    root = tmp_path / "coco"
    shutil.copytree(coco_world["path"], root)
    instances = json.loads((root / "annotations/instances_val.json").read_text())
    on_disk = {p.name for p in (root / "val").iterdir()}
    images = [im for im in instances["images"] if im["file_name"] in on_disk][:9]
    images.append({"id": 500, "file_name": "gone.jpg"})  # listed, not on disk
    anns = [{"id": 10 * im["id"] + j, "image_id": im["id"], "caption": f"a red ball number {im['id']} seen {j}"}
            for im in images[1:-1] for j in range(2)]  # images[0]: no caption
    anns.append({"id": 1, "image_id": 999, "caption": "an orphan"})
    (root / "annotations/captions_val.json").write_text(json.dumps({"images": images, "annotations": anns}))
    rec = _recipe("incontext_caption", root, path, "sentence.captions_from=coco", "sentence.examples=3",
                  "sentence.images_per_unit=100")
    sentences, rejects, items, _ = run_plain(rec)
    by_id = {im["file_name"]: im["id"] for im in images}
    assert len(sentences) == 2  # 8 captioned images -> two groups of 4
    for s in sentences:
        row = s.to_row("incontext_caption")
        texts = [ids for k, ids in T.split_layout(row["tokens"], json.loads(row["meta"])["layout"]) if k == "text"]
        for image, ids in zip(s.images, texts):
            caption = tok.decode((ids.astype(np.int64) - T.TEXT_OFFSET).tolist())
            assert caption.startswith(f"a red ball number {by_id[Path(image.key).name]} seen ")
    reasons = {(r.key, r.reason) for r in rejects}
    assert (f"val/{images[0]['file_name']}", "no_caption") in reasons and ("val/gone.jpg", "missing_image") in reasons
    assert ("annotations/captions_val.json#1", "missing_image") in reasons
    unlisted = on_disk - {im["file_name"] for im in images}
    assert {f"val/{n}" for n in unlisted} == {k for k, r in reasons if r == "missing_annotation"}


def test_segmentation_sentences_keep_one_class(text_tokenizer, coco_world):
    path, tok = text_tokenizer
    rec = _recipe("incontext_segmentation", coco_world["path"], path, "sentence.examples=2", "sentence.min_area=0.002",
                  "sentence.max_text_tokens=400")
    sentences, rejects, items, pixels = run_plain(rec)
    assert sentences
    masks = {it.key: it.meta for it in items if it.meta.get("role") == "mask"}
    for s in sentences:
        assert len(s.images) == 6 and s.task == "incontext_segmentation"
        row = s.to_row("incontext_segmentation")
        kinds = [k for k, _ in json.loads(row["meta"])["layout"]]
        assert kinds == ["image", "text", "image"] * 3
        mask_keys = [im.key for im in s.images[1::2]]
        assert {masks[k]["category_id"] for k in mask_keys} == {s.meta["category_id"]}
        assert [masks[k]["pair"] for k in mask_keys] == [im.key for im in s.images[0::2]]
        texts = [p for k, p in T.split_layout(row["tokens"], json.loads(row["meta"])["layout"]) if k == "text"]
        for key, ids in zip(mask_keys, texts):
            decoded = tok.decode((ids.astype(np.int64) - T.TEXT_OFFSET).tolist())
            assert decoded.startswith(f"{masks[key]['category']} at [")
            boxes = np.array([[int(v) for v in b.split("]")[0].split(",")] for b in decoded.split("[")[1:]])
            assert len(boxes) == len(masks[key]["boxes"])
            # the mask's white pixels lie inside the union of the class's boxes (0..999 of the image)
            ys, xs = np.nonzero(pixels[key][..., 0] > 127)
            scale, tol = 999 / 255, 12
            assert boxes[:, 0].min() <= xs.min() * scale + tol and boxes[:, 2].max() >= xs.max() * scale - tol
            assert boxes[:, 1].min() <= ys.min() * scale + tol and boxes[:, 3].max() >= ys.max() * scale - tol
    reasons = Counter(r.reason for r in rejects)
    assert reasons["bad_json"] == 1 and reasons["missing_image"] >= 1


def test_incontext_round_trip_through_ray_loader_and_model(ray_local, text_tokenizer, laion_world, coco_world, tmp_path):
    import torch

    from uvd.model.config import VOCAB_SIZE, ModelConfig
    from uvd.model.data import PackedLoader, check_vocab_size, data_vocab_size
    from uvd.model.evaluate import eval_examples, evaluate
    from uvd.model.llama import LLaMA
    from uvd import manifest as M
    from uvd.runner import run_recipe
    from uvd.stats import compute_stats

    path, tok = text_tokenizer
    rec = _recipe("incontext_caption", laion_world["path"], path, "sentence.examples=2", "filters.dedup=false")
    sentences, _, _, _ = run_plain(rec)  # the plain run does not dedup
    out = tmp_path / "caption"
    run_recipe(rec, out, progress=False)
    manifest = M.read_manifest(out)
    rows = [r for shard in sorted(manifest["shards"]) for r in pq.read_table(out / shard).to_pylist()]
    assert sorted(r["id"] for r in rows) == sorted(s.sentence_id("incontext_caption") for s in sentences)
    num_tokens = sum(len(r["tokens"]) for r in rows)
    assert num_tokens > 256 * sum(r["num_images"] for r in rows)  # the captions' ids are counted

    # a pixel-only LAION run of the same world: rows unchanged (no layout, 256 visual ids per image)
    laion = load_recipe(RECIPES / "laion.yaml", [f"inputs={laion_world['path']}", *TEST_OVERRIDES])
    run_recipe(laion, tmp_path / "laion", progress=False)
    lm = M.read_manifest(tmp_path / "laion")
    singles = {}
    for shard in lm["shards"]:
        for r in pq.read_table(tmp_path / "laion" / shard).to_pylist():
            meta = json.loads(r["meta"])
            assert "layout" not in meta and "text_tokenizer" not in meta
            assert len(r["tokens"]) == 256 * r["num_images"] and max(r["tokens"]) < 8192
            singles[r["images"][0]] = r["tokens"]
    checked = 0
    for r in rows:  # each image segment of a caption sentence is that image's pixel-only tokens
        parts = T.split_layout(np.array(r["tokens"], np.uint16), json.loads(r["meta"])["layout"])
        for key, (kind, ids) in zip(r["images"], parts[0::2]):
            assert kind == "image"
            if key in singles:
                assert ids.tolist() == singles[key]
                checked += 1
    assert checked >= len(rows)

    # stats: per-source and per-task shares count the text ids too
    stats = compute_stats(tmp_path)
    laion_tokens = sum(c["tokens"] for c in lm["shards"].values())
    caption = stats["by_source"]["incontext_caption"]
    assert caption["tokens"] == caption["tasks"]["incontext_caption"]["tokens"] == num_tokens
    assert stats["totals"]["tokens"] == num_tokens + laion_tokens
    assert caption["tasks"]["incontext_caption"]["token_share"] == pytest.approx(num_tokens / (num_tokens + laion_tokens))
    assert stats["rejected_by_reason"].get("unused_remainder", 0) + stats["rejected_by_reason"].get("no_partner", 0) < 3
    from uvd.audit import run_audit

    audit = run_audit(tmp_path, use_ray=False)[0]  # reads every row: the same per-task tokens and shares
    task = audit["by_source"]["incontext_caption"]["tasks"]["incontext_caption"]
    assert task["tokens"] == num_tokens and task["token_share"] == pytest.approx(num_tokens / (num_tokens + laion_tokens))
    again = run_recipe(rec, out, progress=False)  # resume: nothing to redo, the same shards
    assert again.already_complete and M.read_manifest(out)["shards"] == manifest["shards"]

    seg_rec = _recipe("incontext_segmentation", coco_world["path"], path, "sentence.examples=2", "sentence.min_area=0.002")
    seg_sentences, seg_rejects, _, _ = run_plain(seg_rec)
    seg = tmp_path / "segmentation"
    summary = run_recipe(seg_rec, seg, progress=False)
    seg_rows = [r for shard in sorted(M.read_manifest(seg)["shards"]) for r in pq.read_table(seg / shard).to_pylist()]
    assert sorted(r["id"] for r in seg_rows) == sorted(s.sentence_id("incontext_segmentation") for s in seg_sentences)
    assert summary.rejected_by_reason == dict(sorted(Counter(r.reason for r in seg_rejects).items()))
    examples = eval_examples([out, seg], max_per_task=50)
    first = {r["task"]: r for r in (rows[0], seg_rows[0])}
    assert len(examples["incontext_caption"]) == len(rows) and len(examples["incontext_segmentation"]) == len(seg_rows)
    for task, (context, target) in ((t, e[0]) for t, e in examples.items()):
        layout = json.loads(first[task]["meta"])["layout"]
        assert layout[-1][0] == ("text" if task == "incontext_caption" else "image") and len(target) == layout[-1][1]
        assert np.concatenate([context, target]).tolist() == first[task]["tokens"]

    vocab = VOCAB_SIZE + tok.get_vocab_size(with_added_tokens=True)
    assert data_vocab_size([out]) == vocab and data_vocab_size([tmp_path / "laion"]) == VOCAB_SIZE
    with pytest.raises(ValueError, match="model.vocab_size"):
        check_vocab_size(VOCAB_SIZE, [out, tmp_path / "laion"])
    loader = PackedLoader([out, tmp_path / "laion"], seq_len=512, batch_size=2, vocab_size=vocab)
    x, y = loader.next_batch()
    assert int(x.max()) >= T.TEXT_OFFSET  # text ids reach the model
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(dim=32, num_layers=1, num_heads=2, vocab_size=vocab, max_seq_len=2048))
    _, loss = model(x, y)
    assert torch.isfinite(loss) and abs(loss.item() - np.log(vocab)) < 1.0  # untrained: near uniform
    results = evaluate(model, [out, seg], max_prompts_per_task=4, num_windows=2, batch_size=2, seq_len=512)
    for task, count in (("incontext_caption", len(rows)), ("incontext_segmentation", len(seg_rows))):
        entry = results["tasks"][task]
        assert entry["kind"] == "incontext" and entry["prompts"] == min(4, count)
        assert 1 < entry["perplexity"] < 3 * vocab  # an untrained model: about the vocabulary size
    small = LLaMA(ModelConfig(dim=32, num_layers=1, num_heads=2, max_seq_len=2048))
    with pytest.raises(ValueError, match="model.vocab_size"):
        evaluate(small, [out], max_prompts_per_task=1, num_windows=1, seq_len=512)
