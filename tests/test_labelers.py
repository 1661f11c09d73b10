"""Labelers on real architectures from small configs with random weights saved the library's own way
(save_pretrained, torch.save, torch.jit.save), offline; outputs checked against the library's own
pre/post-processing or an independent computation, and every weights mistake named before any work."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from uvd.pipelines import render
from uvd.pipelines.labelers import LabelersOptions, LabelerStage, build_labeler, decode_label, encode_label
from uvd.pipelines.labelers.edges import EdgesLabeler, _hed_network
from uvd.pipelines.labelers.normals import normals_from_depth
from uvd.pipelines.labelers.pose import draw_people

HAS_MMPOSE = importlib.util.find_spec("mmpose") is not None


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    return np.ascontiguousarray(base.repeat(16, axis=1).repeat(16, axis=2))  # (3, 256, 256, 3), blocky images


def _save(model, folder, processor=None):
    torch.manual_seed(0)
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import (AutoModelForDepthEstimation, AutoModelForSemanticSegmentation, AutoModelForUniversalSegmentation,
                              DepthAnythingConfig, Dinov2Config, DPTConfig, Mask2FormerConfig, SegformerConfig, SwinConfig)
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dinov2 = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=70,
                          out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
    depth_anything = DepthAnythingConfig(backbone_config=dinov2, fusion_hidden_size=16, neck_hidden_sizes=[8, 16, 32, 32],
                                         reassemble_hidden_size=32, head_hidden_size=8, patch_size=14)
    da_processor = DPTImageProcessorPil(size={"height": 70, "width": 70}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                        ensure_multiple_of=14, keep_aspect_ratio=False)
    dpt = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=16,
                    neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3], head_hidden_size=8)
    segformer = dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
                     num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16)
    seg_processor = SegformerImageProcessorPil(size={"height": 64, "width": 64})
    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    mask2former = Mask2FormerConfig(backbone_config=swin, num_labels=150, hidden_dim=32, mask_feature_size=32, feature_size=32, num_queries=8,
                                    encoder_layers=1, decoder_layers=2, encoder_feedforward_dim=32, dim_feedforward=32, num_attention_heads=2,
                                    common_stride=4, use_pretrained_backbone=False)
    return {
        "depth_anything": _save(AutoModelForDepthEstimation.from_config(depth_anything), root / "depth_anything", da_processor),
        "depth_anything_other": _save(AutoModelForDepthEstimation.from_config(depth_anything), root / "depth_anything_other", da_processor),
        "dpt": _save(AutoModelForDepthEstimation.from_config(dpt), root / "dpt"),
        "segformer_ade": _save(AutoModelForSemanticSegmentation.from_config(SegformerConfig(num_labels=150, **segformer)), root / "segformer", seg_processor),
        "segformer_voc": _save(AutoModelForSemanticSegmentation.from_config(SegformerConfig(num_labels=21, **segformer)), root / "segformer_voc", seg_processor),
        "mask2former": _save(AutoModelForUniversalSegmentation.from_config(mask2former), root / "mask2former",
                             SegformerImageProcessorPil(size={"height": 64, "width": 64})),
    }


def test_depth_anything_matches_the_library_pipeline_and_renders_disparity(models, pixels):
    from transformers import AutoModelForDepthEstimation
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    labeler = build_labeler({"name": "depth", "kind": "depth", "weights": str(models["depth_anything"]), "batch_size": 2})
    labels = labeler.label(pixels)
    assert len(labels) == 3 and labels[0].shape == (256, 256) and labels[0].dtype == np.float32
    # reference: the library's own image processor and model, upsampled the same way
    processor = DPTImageProcessorPil.from_pretrained(models["depth_anything"])
    model = AutoModelForDepthEstimation.from_pretrained(models["depth_anything"]).eval()
    with torch.no_grad():
        inputs = processor(images=list(pixels), return_tensors="pt")
        ref = torch.nn.functional.interpolate(model(**inputs).predicted_depth[:, None], size=(256, 256), mode="bilinear")[:, 0].numpy()
    for ours, theirs in zip(labels, ref):
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99  # PIL vs torch bicubic resize differ slightly
    rendered = labeler(pixels)
    assert len(rendered) == 3 and all(r.shape == (256, 256, 3) and r.dtype == np.uint8 for r in rendered)
    assert np.array_equal(rendered[1], render.render_disparity(labels[1]))
    # batching does not change results
    single = build_labeler({"name": "depth", "kind": "depth", "weights": str(models["depth_anything"]), "batch_size": 8}).label(pixels)
    assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(labels, single))


def test_disparity_renders_near_bright():
    out = render.render_disparity(np.array([[1.0, 2.0], [4.0, np.nan]]), "grayscale")
    assert out[1, 0, 0] == 255 and out[0, 0, 0] == 1 and out[0, 1, 0] > 1 and not out[1, 1].any()
    assert (render.render_disparity(np.full((2, 2), 3.0), "grayscale") == 128).all()


def test_dpt_and_identity_follow_the_weights(models, pixels):
    dpt = build_labeler({"name": "depth", "kind": "depth", "weights": str(models["dpt"])})
    assert dpt(pixels[:1])[0].shape == (256, 256, 3)
    a = build_labeler({"name": "depth", "kind": "depth", "weights": str(models["depth_anything"])}).identity()
    b = build_labeler({"name": "depth", "kind": "depth", "weights": str(models["depth_anything_other"])}).identity()
    c = build_labeler({"name": "depth", "kind": "depth", "weights": str(models["depth_anything"]), "options": {"mode": "grayscale"}}).identity()
    assert a["kind"] == "depth" and a["dtype"] == "float32" and len(a["weights_sha256"]) == 64
    assert a["weights_sha256"] != b["weights_sha256"] and a["options"] != c["options"] and a["weights_sha256"] == c["weights_sha256"]


@pytest.mark.parametrize("name", ["segformer_ade", "mask2former"])
def test_ade20k_segmentation_matches_the_library_post_processing(name, models, pixels):
    from transformers import AutoModelForSemanticSegmentation, AutoModelForUniversalSegmentation
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    labeler = build_labeler({"name": "segmentation", "kind": "segmentation", "weights": str(models[name])})
    labels = labeler.label(pixels)
    assert labels[0].shape == (256, 256) and labels[0].dtype == np.uint8 and labeler.ade20k
    assert all(1 <= lab.min() and lab.max() <= 150 for lab in labels)  # ADE20K values: class + 1
    processor = SegformerImageProcessorPil.from_pretrained(models[name])
    with torch.no_grad():
        inputs = processor(images=list(pixels), return_tensors="pt")
        if name == "mask2former":
            out = AutoModelForUniversalSegmentation.from_pretrained(models[name]).eval()(pixel_values=inputs["pixel_values"])
            post = Mask2FormerImageProcessorPil()
        else:
            out = AutoModelForSemanticSegmentation.from_pretrained(models[name]).eval()(pixel_values=inputs["pixel_values"])
            post = processor
        ref = post.post_process_semantic_segmentation(out, target_sizes=[(256, 256)] * 3)
    for ours, theirs in zip(labels, ref):
        assert (ours.astype(int) - 1 == theirs.numpy()).mean() > 0.9  # resize paths differ at class borders only
    rendered = labeler(pixels)[0]
    assert np.array_equal(rendered, render.ADE20K_PALETTE[labels[0]])


def test_other_label_sets_use_the_voc_palette(models, pixels):
    labeler = build_labeler({"name": "seg", "kind": "segmentation", "weights": str(models["segformer_voc"])})
    labels = labeler.label(pixels[:1])
    assert not labeler.ade20k and labels[0].max() <= 20
    assert np.array_equal(labeler(pixels[:1])[0], render.PALETTE[labels[0]])


def test_canny_is_the_shared_renderer(pixels):
    labeler = build_labeler({"name": "edges", "kind": "edges"})
    assert labeler.identity() == {"kind": "edges", "weights_sha256": None, "dtype": "float32", "options": {"high": 200, "low": 100, "method": "canny"}}
    assert all(np.array_equal(a, render.canny_edges(image)) for a, image in zip(labeler(pixels), pixels))


def _hed_reference(state: dict, image: np.ndarray) -> np.ndarray:
    """HED written out with torch.nn.functional on the raw state dict (no module classes)."""
    F = torch.nn.functional
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    h, sides = x - state["norm"], []
    for i, n in enumerate((2, 2, 3, 3, 3), start=1):
        if i > 1:
            h = F.max_pool2d(h, 2)
        for j in range(n):
            h = F.relu(F.conv2d(h, state[f"block{i}.convs.{j}.weight"], state[f"block{i}.convs.{j}.bias"], padding=1))
        side = F.conv2d(h, state[f"block{i}.projection.weight"], state[f"block{i}.projection.bias"])
        sides.append(F.interpolate(side, size=(256, 256), mode="bilinear"))
    return torch.sigmoid(torch.cat(sides, 1).mean(1))[0].numpy()


def test_hed_loads_a_state_dict_and_matches_a_functional_reference(tmp_path, pixels):
    torch.manual_seed(0)
    state = _hed_network().state_dict()
    state["norm"] = torch.tensor([120.0, 115.0, 100.0]).view(1, 3, 1, 1)
    path = tmp_path / "ControlNetHED.pth"
    torch.save(state, path)
    labeler = EdgesLabeler(str(path), device="cpu", method="hed")
    labels = labeler.label(pixels[:2])
    assert labels[0].shape == (256, 256) and 0 <= labels[0].min() and labels[0].max() <= 1
    assert np.allclose(labels[0], _hed_reference(state, pixels[0]), atol=1e-5)
    assert np.array_equal(labeler(pixels[:1])[0], render.render_edges(labels[0]))
    del state["block5.projection.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="broken.pth.*block5.projection.bias"):
        EdgesLabeler(str(tmp_path / "broken.pth"), method="hed")


def test_normals_from_depth_of_a_plane_and_a_fronto_parallel_wall():
    f = 0.5 * 64 / np.tan(np.radians(60) / 2)
    v, u = np.mgrid[0:48, 0:64].astype(float)
    rays = np.stack([(u - 31.5) / f, (v - 23.5) / f, np.ones_like(u)], -1)
    n = np.array([0.3, -0.4, -0.866])
    n /= np.linalg.norm(n)
    depth = -2.0 / (rays @ n)  # the plane n . P = -2 (in front of the camera)
    normals = normals_from_depth(depth, 60)
    assert np.allclose(normals[2:-2, 2:-2], n, atol=1e-6)
    wall = normals_from_depth(np.full((10, 10), 3.0))
    assert np.allclose(wall, (0, 0, -1))


def test_normals_labelers_from_depth_and_from_torchscript(models, pixels, tmp_path):
    from_depth = build_labeler({"name": "normals", "kind": "normals", "options": {"depth_weights": str(models["depth_anything"])}})
    labels = from_depth.label(pixels[:2])
    assert labels[0].shape == (256, 256, 3) and np.allclose(np.linalg.norm(labels[0], axis=-1), 1, atol=1e-4)
    f = 128 / np.tan(np.radians(30))
    v, u = np.mgrid[0:256, 0:256]
    rays = np.stack([(u - 127.5) / f, (v - 127.5) / f, np.ones((256, 256))], -1)
    assert (np.sum(labels[0] * rays, -1) <= 1e-5).all()  # every normal faces the camera
    assert np.array_equal(from_depth(pixels[:2])[0], render.render_normals(labels[0]))

    torch.manual_seed(0)
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1)))
    torch.jit.save(net, tmp_path / "normals.pt")
    spec = {"name": "normals", "kind": "normals", "weights": str(tmp_path / "normals.pt"), "options": {"input_size": 128}}
    a = build_labeler(spec).label(pixels[:1])[0]
    flipped = build_labeler({**spec, "options": {"input_size": 128, "axes": [1, -1, 1]}}).label(pixels[:1])[0]
    assert np.allclose(np.linalg.norm(a, axis=-1), 1, atol=1e-4)
    assert np.allclose(flipped[..., 1], -a[..., 1], atol=1e-5) and np.allclose(flipped[..., 0], a[..., 0], atol=1e-5)


def test_weights_mistakes_are_named_before_any_work(models, tmp_path):
    cases = [
        ({"kind": "depth", "weights": str(tmp_path / "nowhere")}, "nowhere does not exist"),
        ({"kind": "depth"}, "needs local weights"),
        ({"kind": "depth", "weights": str(models["segformer_ade"])}, "config.json is a 'segformer' model"),
        ({"kind": "segmentation", "weights": str(models["dpt"])}, "dpt does not (load|fit)"),  # DPT depth, not DPT segmentation
        ({"kind": "edges", "options": {"method": "hed"}}, "HED"),
        ({"kind": "normals", "weights": str(models["dpt"])}, "is a folder"),
        ({"kind": "pose", "weights": str(tmp_path / "pose.pth")}, "pose.pth does not exist"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(({"kind": "depth", "weights": str(empty)}, "empty/config.json is missing"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((models["dpt"] / "config.json").read_text())
    cases.append(({"kind": "depth", "weights": str(no_weights)}, "has no model.safetensors"))
    for spec, match in cases:
        with pytest.raises(ValueError, match=match):
            build_labeler({"name": "x", **spec})
    with pytest.raises(ValueError, match="options"):
        build_labeler({"name": "x", "kind": "edges", "options": {"sigma": 3}})


@pytest.mark.skipif(HAS_MMPOSE, reason="MMPose is installed: the missing-extra message cannot show")
def test_pose_without_mmpose_says_how_to_install_it(tmp_path):
    (tmp_path / "pose.pth").write_bytes(b"x")
    (tmp_path / "config.py").write_text("model = dict()\n")
    with pytest.raises(ValueError, match="EXTRAS=pose"):
        build_labeler({"name": "pose", "kind": "pose", "weights": str(tmp_path / "pose.pth"), "options": {"config": str(tmp_path / "config.py")}})


def test_pose_drawing_drops_joints_outside_the_image():
    people = np.zeros((2, 17, 3), np.float32)
    people[0, 5], people[0, 7] = (100, 100, 2), (100, 150, 2)  # left shoulder -> left elbow
    people[1, 6], people[1, 8] = (300, 20, 2), (200, 20, 2)  # right shoulder outside the 256 image
    out = draw_people(people, 256, 256)
    assert out[125, 100].any() and out[20, 200].any() and not out[20, 210:256].any()  # the elbow is drawn, its limb not
    assert not draw_people(np.zeros((0, 17, 3)), 256, 256).any()


def test_recipe_section_schema():
    options = LabelersOptions.from_dict({"save": True, "models": [{"name": "depth", "kind": "depth", "weights": "/m"}, {"name": "edges", "kind": "edges"}]})
    assert options.save and [m.name for m in options.models] == ["depth", "edges"] and options.models[1].dtype == "auto"
    for data, match in [({"models": [{"name": "a", "kind": "sketch"}]}, r"labelers\.models\[0\]\.kind"),
                        ({"models": [{"name": "a", "kind": "edges", "colour": 1}]}, r"labelers\.models\[0\]\.colour"),
                        ({"models": [{"name": "a", "kind": "edges"}, {"name": "a", "kind": "depth"}]}, "two labelers"),
                        ({"models": [{"name": "a", "kind": "edges", "dtype": "fp8"}]}, r"models\[0\]\.dtype"),
                        ({"saving": True}, r"labelers\.saving")]:
        with pytest.raises(ValueError, match=match):
            LabelersOptions.from_dict(data)


def test_stage_adds_renderings_and_raw_labels_and_skips_rejects(models, pixels):
    stage = LabelerStage([{"name": "edges", "kind": "edges"}, {"name": "seg", "kind": "segmentation", "weights": str(models["segformer_ade"])}],
                         device="cpu", save=True)
    batch = {"pixels": pixels, "reject": np.array(["", "corrupt_image", ""], dtype=object)}
    out = stage(batch)
    assert out["annotation/edges"].shape == (3, 256, 256, 3) and not out["annotation/seg"][1].any()
    assert np.array_equal(out["annotation/edges"][2], render.canny_edges(pixels[2]))
    seg = decode_label(out["label/seg"][0])
    assert seg.dtype == np.uint8 and seg.shape == (256, 256) and out["label/seg"][1] == b""
    assert np.array_equal(out["annotation/seg"][0], render.ADE20K_PALETTE[seg])
    assert set(stage.identities()) == {"edges", "seg"}
    people = np.zeros((2, 17, 3), np.float32)
    assert np.array_equal(decode_label(encode_label(people)), people)


def test_stage_runs_in_a_ray_actor_pool(ray_local, pixels):
    import ray

    ds = ray.data.from_items([{"pixels": p, "reject": ""} for p in pixels])
    ds = ds.map_batches(LabelerStage, fn_constructor_kwargs={"specs": [{"name": "edges", "kind": "edges"}], "device": "cpu"},
                        batch_size=2, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    rows = ds.take_all()
    expected = {render.canny_edges(p).tobytes() for p in pixels}
    assert {np.asarray(r["annotation/edges"]).tobytes() for r in rows} == expected
    assert json.dumps(sorted(rows[0]))  # the columns are plain names
