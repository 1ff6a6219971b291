"""Panoptic-DeepLab post-processing against Detectron2's reference implementation."""
import json
import subprocess
import sys

import pytest
import torch
from detectron2.projects.panoptic_deeplab.post_processing import get_panoptic_segmentation

from gbw_panoptic.modeling.post_processing import (
    find_instance_centers,
    panoptic_segmentation,
    panoptic_to_segments,
)

LABEL_DIVISOR = 1000


def _random_predictions(seed: int, batch: int, height: int, width: int, num_classes: int, integer_offsets: bool):
    """Blocky semantic maps, peaked center heatmaps and offsets (integer ones create distance ties)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (batch, 1, height // 8 + 1, width // 8 + 1), generator=generator)
    sem_seg = torch.nn.functional.interpolate(coarse.float(), scale_factor=8, mode="nearest")[:, 0, :height, :width]
    center = torch.rand((batch, 1, height, width), generator=generator) ** 8
    offsets = torch.randn((batch, 2, height, width), generator=generator) * 6
    if integer_offsets:
        offsets = offsets.round()
    return sem_seg.long(), center, offsets


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(
    "thing_ids, stuff_area, top_k, integer_offsets",
    [
        ({11, 12, 13, 14, 15, 16, 17, 18}, 64, 200, False),
        ({0, 3}, 0, 5, True),
        (set(), 100, 200, False),
        (set(range(19)), 64, 50, True),
    ],
)
def test_equals_detectron2(seed, thing_ids, stuff_area, top_k, integer_offsets):
    sem_seg, center, offsets = _random_predictions(seed, 3, 48, 72, 19, integer_offsets)
    ours = torch.stack(
        [
            panoptic_segmentation(
                sem_seg[index], center[index], offsets[index], thing_ids, LABEL_DIVISOR, stuff_area, -1,
                threshold=0.1, nms_kernel=7, top_k=top_k,
            )
            for index in range(sem_seg.size(0))
        ]
    )  # fmt: skip
    for index in range(sem_seg.size(0)):
        reference, _ = get_panoptic_segmentation(
            sem_seg[index : index + 1],
            center[index].clone(),
            offsets[index],
            thing_ids=thing_ids,
            label_divisor=LABEL_DIVISOR,
            stuff_area=stuff_area,
            void_label=-1,
            threshold=0.1,
            nms_kernel=7,
            top_k=top_k,
        )
        assert torch.equal(ours[index], reference[0]), f"image {index} differs"
    # The random inputs exercise the instance path: some thing pixels get an instance.
    assert bool(((ours > 0) & (ours % LABEL_DIVISOR > 0)).any()) == bool(thing_ids)


def test_things_are_found_and_numbered_per_class():
    """Two car blobs and one person blob around clear centers: ids car*1000+1, +2, person*1000+1."""
    sem_seg = torch.zeros((1, 40, 60), dtype=torch.long)
    sem_seg[0, 5:15, 5:15] = 13
    sem_seg[0, 5:15, 40:50] = 13
    sem_seg[0, 25:35, 20:30] = 11
    center = torch.zeros((1, 1, 40, 60))
    for y, x in [(10, 10), (10, 45), (30, 25)]:
        center[0, 0, y, x] = 0.9
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")
    offsets = torch.zeros((1, 2, 40, 60))
    blobs = [((5, 15, 5, 15), (10, 10)), ((5, 15, 40, 50), (10, 45)), ((25, 35, 20, 30), (30, 25))]
    for (y0, y1, x0, x1), (cy, cx) in blobs:
        offsets[0, 0, y0:y1, x0:x1] = cy - ys[y0:y1, x0:x1]
        offsets[0, 1, y0:y1, x0:x1] = cx - xs[y0:y1, x0:x1]
    panoptic = panoptic_segmentation(sem_seg[0], center[0], offsets[0], range(11, 19), LABEL_DIVISOR, 100, -1)
    assert set(panoptic.unique().tolist()) == {0, 13001, 13002, 11001}
    assert (panoptic[5:15, 5:15] == 13001).all() and (panoptic[5:15, 40:50] == 13002).all()
    png, segments = panoptic_to_segments(panoptic, LABEL_DIVISOR, range(11, 19))
    assert png.dtype == torch.int32 and png.min() >= 1
    by_label = {s["panoptic_label"]: s for s in segments}
    assert by_label[13001]["isthing"] and by_label[13001]["category_id"] == 13 and by_label[13001]["area"] == 100
    assert not by_label[0]["isthing"] and by_label[0]["category_id"] == 0
    for segment in segments:
        assert int((png == segment["id"]).sum()) == segment["area"]


def test_segments_void_and_small_stuff():
    """Stuff below the area threshold and thing pixels without a center are void (png 0)."""
    sem_seg = torch.zeros((1, 20, 20), dtype=torch.long)
    sem_seg[0, :2, :2] = 5  # 4 pixels of stuff class 5
    sem_seg[0, 10:, 10:] = 12  # thing without any center
    panoptic = panoptic_segmentation(
        sem_seg[0], torch.zeros((1, 20, 20)), torch.zeros((2, 20, 20)), [12], LABEL_DIVISOR, 10, -1
    )
    png, segments = panoptic_to_segments(panoptic, LABEL_DIVISOR, [12])
    assert (png[:2, :2] == 0).all() and (png[10:, 10:] == 0).all()
    assert [s["category_id"] for s in segments] == [0]
    assert int((png == 0).sum()) == 4 + 100


def test_find_instance_centers_top_k_and_shape_check():
    heatmap = torch.zeros((1, 30, 30))
    heatmap[0, 5, 5], heatmap[0, 20, 20], heatmap[0, 10, 12] = 0.5, 0.9, 0.7
    centers = find_instance_centers(heatmap, threshold=0.1, nms_kernel=7, top_k=None)
    assert centers.tolist() == [[5, 5], [10, 12], [20, 20]]
    # Strictly above the 2nd largest score: only the 0.9 peak.
    assert find_instance_centers(heatmap, threshold=0.1, nms_kernel=7, top_k=2).tolist() == [[20, 20]]
    with pytest.raises(ValueError, match="1 x H x W"):
        find_instance_centers(heatmap[0])
    with pytest.raises(ValueError, match="sem_seg must be H x W"):
        panoptic_segmentation(
            torch.zeros((1, 30, 30), dtype=torch.long), heatmap, torch.zeros((2, 30, 30)), [1], LABEL_DIVISOR, 0, -1
        )


def test_bench_post_processing_agrees_with_detectron2(repo_root, tmp_path):
    """The benchmark runs the model's per-image path and Detectron2's on the same inputs and writes
    the ratio (it raises if the panoptic maps differ)."""
    output = tmp_path / "bench.json"
    command = [
        sys.executable, str(repo_root / "tools" / "bench_post_processing.py"), "--sizes", "48x96",
        "--instances", "4", "--repeats", "1", "--device", "cpu", "--out", str(output),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    (result,) = json.loads(output.read_text())["results"]
    assert result["identical"] and result["size"] == "48x96"
    assert result["speedup_vs_detectron2"] == result["median_ms"]["detectron2"] / result["median_ms"]["ours"]
