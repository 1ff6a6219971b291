"""Rare class sampling: the class probability formula, sampling frequencies, seeding, sharding."""
import itertools
import json

import numpy as np
import pytest

from gbw_panoptic.data import RareClassSampler, load_class_pixel_counts, rcs_class_probabilities

# 6 images x 4 classes: class 0 is everywhere (frequent), class 3 is rare and only in image 5,
# class 2 has many pixels in image 3 but few (below MIN_PIXELS) in image 4.
CLASS_PIXELS = np.array(
    [
        [900, 100, 0, 0],
        [800, 200, 0, 0],
        [1000, 0, 0, 0],
        [500, 0, 500, 0],
        [990, 0, 10, 0],
        [700, 250, 0, 50],
    ]
)
MIN_PIXELS = 40


def expected_image_probabilities(class_pixels: np.ndarray, temperature: float, min_pixels: int) -> np.ndarray:
    """P(image) = sum_c P(c) * [image qualifies for c] / #qualifying images, from the formula."""
    totals = class_pixels.sum(axis=0).astype(float)
    frequency = totals / totals.sum()
    weights = np.where(totals > 0, np.exp((1 - frequency) / temperature), 0.0)
    class_probability = weights / weights.sum()
    image_probability = np.zeros(len(class_pixels))
    for c, p in enumerate(class_probability):
        qualifying = class_pixels[:, c] > min_pixels
        if not qualifying.any():
            qualifying = class_pixels[:, c] > 0
        if p > 0:
            image_probability[qualifying] += p / qualifying.sum()
    return image_probability


def test_class_probabilities_follow_formula():
    totals = np.array([6000.0, 2000.0, 1500.0, 500.0, 0.0])
    probabilities = rcs_class_probabilities(totals, temperature=0.1)
    frequency = totals[:4] / totals.sum()
    expected = np.exp((1 - frequency) / 0.1)
    np.testing.assert_allclose(probabilities[:4], expected / expected.sum(), rtol=1e-12)
    assert probabilities[4] == 0
    # Small temperature: stable (no overflow) and concentrated on the rarest class.
    sharp = rcs_class_probabilities(totals, temperature=0.001)
    assert np.isfinite(sharp).all() and sharp.argmax() == 3 and sharp[3] > 0.99


def test_class_probabilities_reject_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        rcs_class_probabilities(np.ones(3), 0.0)
    with pytest.raises(ValueError, match="empty"):
        rcs_class_probabilities(np.zeros(3), 0.01)


@pytest.mark.parametrize("temperature", [0.05, 0.3])
def test_sampling_frequencies_follow_formula(temperature):
    draws = 40000
    sampler = RareClassSampler(CLASS_PIXELS, temperature, MIN_PIXELS)
    indices = np.fromiter(itertools.islice(sampler.indices(123, 0), draws), dtype=np.int64)
    observed = np.bincount(indices, minlength=len(CLASS_PIXELS)) / draws
    expected = expected_image_probabilities(CLASS_PIXELS, temperature, MIN_PIXELS)
    # Image 4 only has class 2 below MIN_PIXELS, and image 3 qualifies, so image 4 is never drawn
    # for class 2; it is drawn only via class 0.
    standard_error = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(observed - expected) <= 5 * standard_error + 1e-12), (observed, expected)
    # Rare classes are oversampled compared to uniform image sampling.
    assert observed[5] > 1 / len(CLASS_PIXELS)


def test_min_pixels_falls_back_to_any_image_with_the_class():
    class_pixels = np.array([[1000, 0], [990, 10], [1000, 0]])
    sampler = RareClassSampler(class_pixels, 0.01, min_pixels=3000)
    images_of_class_1 = sampler.images_of_class[list(sampler.classes).index(1)]
    assert images_of_class_1.tolist() == [1]
    draws = list(itertools.islice(sampler.indices(0, 0), 500))
    assert draws.count(1) > 400  # class 1 is by far the rarest


def test_sampler_is_deterministic_under_seed():
    sampler = RareClassSampler(CLASS_PIXELS, 0.1, MIN_PIXELS, chunk_size=256)
    first = list(itertools.islice(sampler.indices(7, 0), 3000))
    again = list(itertools.islice(RareClassSampler(CLASS_PIXELS, 0.1, MIN_PIXELS, chunk_size=256).indices(7, 0), 3000))
    other = list(itertools.islice(sampler.indices(8, 0), 3000))
    assert first == again and first != other


@pytest.mark.parametrize("start", [1, 255, 256, 700, 2999])
def test_sampler_reads_from_any_position(start):
    """Starting at a position (within a chunk or on its border) gives the tail of the stream."""
    sampler = RareClassSampler(CLASS_PIXELS, 0.1, MIN_PIXELS, chunk_size=256)
    full = list(itertools.islice(sampler.indices(3, 0), 3000))
    assert list(itertools.islice(sampler.indices(3, start), 3000 - start)) == full[start:]


def test_sampler_with_class_key_yields_the_drawn_class_with_the_same_indices():
    plain = RareClassSampler(CLASS_PIXELS, 0.1, MIN_PIXELS, chunk_size=256)
    keyed = RareClassSampler(CLASS_PIXELS, 0.1, MIN_PIXELS, chunk_size=256, class_key="rcs_class")
    items = list(itertools.islice(keyed.indices(4, 100), 2000))
    assert [index for index, _ in items] == list(itertools.islice(plain.indices(4, 100), 2000))
    drawn_classes = set()
    for index, fields in items:
        c = fields["rcs_class"]
        drawn_classes.add(c)
        assert index in keyed.images_of_class[list(keyed.classes).index(c)]
    assert {1, 2, 3} <= drawn_classes  # class 0 is too frequent to be drawn at T = 0.1
    # An image qualifies with strictly more than MIN_PIXELS pixels of the class, as the reference.
    at_threshold = np.array([[100, 40], [100, 41]])
    assert RareClassSampler(at_threshold, 0.1, 40).images_of_class[1].tolist() == [1]


def test_sampler_rejects_empty_statistics():
    with pytest.raises(ValueError, match="non-empty"):
        RareClassSampler(np.zeros((0, 19)), 0.01, 3000)


def test_load_class_pixel_counts_aligns_with_dataset(tmp_path):
    stats_file = tmp_path / "class_stats.json"
    stats_file.write_text(json.dumps({"classes": ["a", "b", "c"], "images": {"x": [1, 2, 3], "y": [4, 5, 6]}}))
    dicts = [{"image_id": "y", "file_name": "y.png"}, {"image_id": "x", "file_name": "x.png"}]
    counts = load_class_pixel_counts(str(stats_file), dicts, num_classes=3)
    assert counts.tolist() == [[4, 5, 6], [1, 2, 3]] and counts.dtype == np.int64
    with pytest.raises(KeyError, match="'z'.*z.png.*prepare script"):
        load_class_pixel_counts(str(stats_file), [{"image_id": "z", "file_name": "z.png"}], 3)
    with pytest.raises(ValueError, match="3 class counts, expected 19"):
        load_class_pixel_counts(str(stats_file), dicts, 19)
    stats_file.write_text(json.dumps({"images": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match="no 'images' mapping"):
        load_class_pixel_counts(str(stats_file), dicts, 3)
