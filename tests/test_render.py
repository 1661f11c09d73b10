"""Each renderer against the pixels it must produce."""
import colorsys

import numpy as np
import pytest

from uvd.pipelines import render
from uvd.records import RejectError


def test_segmentation_palette_is_fixed_and_ignore_is_black():
    labels = np.array([[0, 1, 2], [15, 255, 1]], np.uint8)
    out = render.render_segmentation(labels)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert tuple(out[0, 1]) == (128, 0, 0) and tuple(out[0, 2]) == (0, 128, 0)  # PASCAL VOC colormap
    assert tuple(out[1, 0]) == (192, 128, 128)  # VOC "person"
    assert tuple(out[1, 1]) == (0, 0, 0) and tuple(out[0, 0]) == (0, 0, 0)
    assert (out[0, 1] == out[1, 2]).all()  # same class, same color
    assert len({tuple(c) for c in render.PALETTE[:255]}) == 255  # every class its own color
    other = render.render_segmentation(np.full((4, 4), 7, np.int32), ignore_label=7)
    assert not other.any()
    with pytest.raises(RejectError, match="0..255") as err:
        render.render_segmentation(np.array([[300]], np.int32))
    assert err.value.reason == render.BAD_ANNOTATION


def test_detection_box_outline_in_category_color():
    image = np.full((100, 120, 3), 50, np.uint8)
    out = render.render_detection(image, [([10, 20, 40, 30], 3)], thickness=2, tint=0)
    color = render.category_color(3)
    # outline inside the box: x 10..49, y 20..49
    for y, x in [(20, 10), (21, 30), (49, 49), (48, 30), (35, 10), (35, 11), (35, 49), (35, 48)]:
        assert tuple(out[y, x]) == color, (y, x)
    for y, x in [(19, 30), (50, 30), (35, 9), (35, 50), (35, 30), (22, 12)]:
        assert tuple(out[y, x]) == (50, 50, 50), (y, x)
    assert (image == 50).all()  # the input is not modified



def test_category_colors_are_distinct_and_the_golden_ratio_hue():
    colors = [render.category_color(i) for i in range(1, 101)]
    assert len(set(colors)) == 100  # every COCO category id (1..90) gets its own color
    for i in (1, 2, 3, 50, 90):
        hue = (i * (5 ** 0.5 - 1) / 2) % 1.0  # the golden-ratio step, reference HSV -> RGB from colorsys
        reference = colorsys.hsv_to_rgb(int(hue * 180) / 180, 1.0, 1.0)
        assert np.abs(np.array(render.category_color(i)) - 255 * np.array(reference)).max() <= 1, i


def test_detection_boxes_are_thick_and_tinted_by_default():
    """Thickness max(3, side / 40); inside, `tint` of the category color over the image; outlines
    drawn over every tint (an overlapping box does not wash out another's outline)."""
    image = np.full((200, 400, 3), 50, np.uint8)
    a, b = render.category_color(3), render.category_color(7)
    out = render.render_detection(image, [([20, 20, 200, 150], 3), ([100, 60, 200, 100], 7)])
    t = 10  # 400 / 40
    assert tuple(out[100, 20 + t - 1]) == a and tuple(out[100, 20 + t]) != a  # left outline of box 3: 10 px
    tinted = lambda color, base: tuple(int(round(0.65 * v + 0.35 * c)) for v, c in zip(base, color))  # noqa: E731
    assert tuple(out[40, 40]) == tinted(a, (50, 50, 50))  # inside box 3 only
    assert tuple(out[140, 260]) == tinted(b, (50, 50, 50))  # inside box 7 only
    assert tuple(out[120, 150]) == tinted(b, tinted(a, (50, 50, 50)))  # inside both: both tints
    assert tuple(out[100, 100]) == b  # box 7's left outline, over box 3's tint
    assert tuple(out[190, 390]) == (50, 50, 50)  # outside every box
    small = render.render_detection(np.zeros((40, 60, 3), np.uint8), [([0, 0, 30, 30], 1)], tint=0)
    assert tuple(small[15, 2]) == render.category_color(1) and not small[15, 3].any()  # at least 3 px
    with pytest.raises(ValueError, match="tint"):
        render.render_detection(image, [], tint=1.5)


@pytest.mark.parametrize("box", [[100, 20, 40, 30], [-5, 0, 10, 10], [0, 0, 0, 5], [1, 2, 3]])
def test_out_of_range_box_is_refused(box):
    with pytest.raises(RejectError) as err:
        render.render_detection(np.zeros((100, 120, 3), np.uint8), [(box, 1)])
    assert err.value.reason == render.BAD_BOX


def _keypoints(points: dict[int, tuple[float, float, int]]) -> list[float]:
    kp = np.zeros((17, 3))
    for i, p in points.items():
        kp[i] = p
    return kp.reshape(-1).tolist()


def test_pose_limbs_connect_the_right_joints_in_openpose_colors():
    # right shoulder (COCO 6) -> right elbow (8) -> right wrist (10, invisible); left shoulder (5)
    kp = _keypoints({6: (60, 40, 2), 8: (60, 100, 2), 10: (60, 150, 0), 5: (140, 40, 2)})
    out = render.render_pose([kp], 200, 200, thickness=3)
    r_shoulder_elbow = render.OPENPOSE_LIMBS.index((2, 3))
    assert tuple(out[70, 60]) == render.OPENPOSE_COLORS[r_shoulder_elbow] == (255, 170, 0)
    neck_r_shoulder = render.OPENPOSE_LIMBS.index((1, 2))
    assert tuple(out[40, 80]) == render.OPENPOSE_COLORS[neck_r_shoulder] == (255, 0, 0)  # neck at (100, 40)
    neck_l_shoulder = render.OPENPOSE_LIMBS.index((1, 5))
    assert tuple(out[40, 120]) == render.OPENPOSE_COLORS[neck_l_shoulder]
    assert tuple(out[100, 60]) == render.OPENPOSE_COLORS[3]  # the elbow's joint dot (OpenPose joint 3)
    assert not out[120:200].any()  # the invisible wrist and its limb are skipped
    assert not out[:, :50].any() and not out[60:, 70:].any()  # nothing else drawn


def test_pose_min_visibility_and_background():
    kp = _keypoints({6: (60, 40, 2), 8: (60, 100, 1)})
    assert render.render_pose([kp], 200, 200, min_visibility=1)[70, 60].any()
    assert not render.render_pose([kp], 200, 200, min_visibility=2)[70, 60].any()
    background = np.full((200, 200, 3), 9, np.uint8)
    out = render.render_pose([kp], 200, 200, background=background)
    assert tuple(out[190, 190]) == (9, 9, 9) and tuple(out[70, 60]) != (9, 9, 9)


@pytest.mark.parametrize("kp", [_keypoints({6: (260, 40, 2)}), [1, 2, 2], _keypoints({6: (10, 10, 3)})])
def test_bad_keypoints_are_refused(kp):
    with pytest.raises(RejectError) as err:
        render.render_pose([kp], 200, 200)
    assert err.value.reason == render.BAD_KEYPOINTS


def test_depth_near_is_bright_and_missing_is_black():
    depth = np.array([[1000, 2000], [3000, 0]], np.uint16)  # 16-bit millimetres, 0 = no depth
    gray = render.render_depth(depth, "grayscale")
    assert tuple(gray[0, 0]) == (255, 255, 255) and tuple(gray[1, 1]) == (0, 0, 0)
    assert gray[0, 0, 0] > gray[0, 1, 0] > gray[1, 0, 0] >= 1
    color = render.render_depth(depth.astype(np.float32) / 1000)
    assert tuple(color[1, 1]) == (0, 0, 0) and color[0, 0].sum() > color[1, 0].sum()
    nan = render.render_depth(np.array([[1.0, np.nan]]))
    assert not nan[0, 1].any()
    with pytest.raises(RejectError):
        render.render_depth(np.zeros((3, 3)))


def test_normals_map_unit_vectors_to_rgb():
    n = np.zeros((2, 2, 3), np.float32)
    n[0, 0] = (0, 0, 1)
    n[0, 1] = (1, 0, 0)
    n[1, 0] = (0, -1, 0)
    out = render.render_normals(n)
    assert tuple(out[0, 0]) == (128, 128, 255) and tuple(out[0, 1]) == (255, 128, 128)
    assert tuple(out[1, 0]) == (128, 0, 128) and tuple(out[1, 1]) == (0, 0, 0)
    rgb = np.full((2, 2, 3), 77, np.uint8)
    assert (render.render_normals(rgb) == 77).all()
    with pytest.raises(RejectError, match="unit"):
        render.render_normals(np.full((2, 2, 3), 0.2, np.float32))


def test_edges_from_file_and_canny():
    assert tuple(render.render_edges(np.array([[True, False]]))[0, 0]) == (255, 255, 255)
    assert tuple(render.render_edges(np.array([[0.5]]))[0, 0]) == (128, 128, 128)
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    edges = render.canny_edges(image)
    assert edges[32, 14:18].any() and not edges[32, 30:34].any() and not edges[:8].any()


def test_grayscale_and_black_boxes():
    image = np.zeros((10, 10, 3), np.uint8)
    image[..., 0] = 200
    gray = render.grayscale(image)
    assert (gray[..., 0] == gray[..., 1]).all() and gray[0, 0, 0] == 60  # 0.299 * 200
    import random

    boxes = render.random_boxes(random.Random(0), 10, 10, 3, 0.2, 0.4)
    assert len(boxes) == 3 and all(0 <= x and x + w <= 10 and 0 <= y and y + h <= 10 for x, y, w, h in boxes)
    out = render.black_boxes(np.full((10, 10, 3), 255, np.uint8), [(2, 3, 4, 2)])
    assert not out[3:5, 2:6].any() and out[5, 2].all() and out[3, 6].all()
