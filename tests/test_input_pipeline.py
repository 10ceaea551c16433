"""`pde_keras.input_pipeline`: normalisation statistics, batching, padding,
augmentation and shuffling, against NumPy (backend-agnostic)."""

import numpy as np
import pytest

from pde_keras import input_pipeline

pytestmark = pytest.mark.multibackend


# ------------------------------------------------------------ data pipeline


def test_channel_stats_match_numpy():
    images = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    mean, std = input_pipeline.channel_stats(images)
    np.testing.assert_allclose(mean, images.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(std, images.std(axis=(0, 1, 2)))


def _first_epoch(dataset):
    return [tuple(np.asarray(t) for t in batch) for batch in dataset.as_numpy_iterator()]


def test_evaluation_pipeline_keeps_order_and_values():
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4, 1)
    batches = _first_epoch(input_pipeline.make_dataset(images, np.arange(5), 2))
    assert [len(b[1]) for b in batches] == [2, 2, 1]
    x = np.concatenate([b[0] for b in batches])
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, images)


def test_evaluation_pipeline_pads_with_weight_zero():
    images = np.ones((5, 4, 4, 1), np.uint8)
    batches = _first_epoch(input_pipeline.make_dataset(images, np.arange(5), 4, pad_to=2))
    assert [len(b[0]) for b in batches] == [4, 2]
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), [1, 1, 1, 1, 1, 0])
    assert batches[-1][0][-1].max() == 0


def _augmentations(images, augmentation, seed=3):
    """Augments `images` once; returns the result and, per image, its
    (row offset, column offset, flipped) relative to its zero-padded source."""
    labels = np.arange(len(images))
    dataset = input_pipeline.make_dataset(images, labels, len(images),
                                    augmentation=augmentation, seed=seed)
    (x, y), = _first_epoch(dataset)
    size = images.shape[1]
    found = []
    for image, label in zip(x, y):
        padded = np.pad(images[label], ((4, 4), (4, 4), (0, 0)))
        matches = [
            (dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
            if np.array_equal(
                image, (padded[:, ::-1] if flip else padded)[dy:dy + size, dx:dx + size])
        ]
        assert len(matches) == 1, f"image {label}: {matches}"
        found.append(matches[0])
    return x, found


def test_crop_flip_augmentation_is_a_shift_and_flip_per_image():
    images = np.random.default_rng(0).integers(1, 256, (64, 12, 12, 3), dtype=np.uint8)
    x, found = _augmentations(images, "crop_flip")
    # Per image: many different offsets, about half flipped.
    assert len({(dy, dx) for dy, dx, _ in found}) > 20
    assert 16 < sum(flip for _, _, flip in found) < 48
    # Seeded: the same seed gives the same first epoch.
    np.testing.assert_array_equal(_augmentations(images, "crop_flip")[0], x)
    assert not np.array_equal(_augmentations(images, "crop_flip", seed=4)[0], x)


def test_crop_augmentation_never_flips():
    images = np.random.default_rng(1).integers(1, 256, (32, 12, 12, 1), dtype=np.uint8)
    _, found = _augmentations(images, "crop")
    assert {flip for _, _, flip in found} == {0}
    assert len({(dy, dx) for dy, dx, _ in found}) > 10


def test_training_pipeline_reshuffles_every_epoch():
    images = np.zeros((16, 4, 4, 1), np.uint8)
    dataset = input_pipeline.make_dataset(images, np.arange(16), 16, seed=0)
    first, second = (_first_epoch(dataset)[0][1] for _ in range(2))
    assert sorted(first) == list(range(16)) and not np.array_equal(first, second)
