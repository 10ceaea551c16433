"""The input pipeline: the data a run trains and evaluates on, as `tf.data`.

`load_splits(config)` loads a run's dataset (`pde_keras.data`) and takes
its seeded subsets; `make_dataset` batches uint8 images into float32
pixels 0-255, shuffled and augmented for training; `channel_stats` gives
the per-channel normalisation the classifier builds in.

Augmentation, per image: `"crop_flip"` (4-pixel zero padding, random 32x32
crop, random horizontal flip: the CIFAR default), `"crop"`, or `"none"`
(the MNIST default: flipping digits is wrong). Randomness is seeded
(stateless ops).
"""

import numpy as np

from pde_keras import data, validation

AUGMENTATIONS = ("auto", "none", "crop", "crop_flip")
PAD = 4


def channel_stats(images):
    """Per-channel mean and standard deviation of uint8 NHWC `images`.

    Exact (from per-channel histograms), without a float copy of the data.
    """
    values = np.arange(256, dtype=np.float64)
    counts = np.stack([
        np.bincount(images[..., c].ravel(), minlength=256) for c in range(images.shape[-1])
    ]).astype(np.float64)
    total = counts.sum(axis=1)
    mean = counts @ values / total
    variance = counts @ values**2 / total - mean**2
    return mean, np.sqrt(np.maximum(variance, 0.0))


def make_dataset(images, labels, batch_size, *, augmentation="none", seed=None,
                 drop_remainder=False, pad_to=1):
    """A batched `tf.data.Dataset` of (float32 pixels 0-255, int64 labels).

    With `seed` (training) the examples are shuffled every epoch and
    augmented per image: `"crop"` pads 4 zero pixels and crops back at a
    random offset, `"crop_flip"` also flips left-right with probability 1/2.
    Without `seed` (evaluation), the order is kept and nothing is random.
    With `pad_to` > 1, zero images are appended until the count is a
    multiple of `pad_to`, and the elements carry a third entry, the sample
    weight: 1 for the examples, 0 for the padding.
    """
    import tensorflow as tf

    validation.check_choice("augmentation", augmentation, AUGMENTATIONS[1:])
    tensors = (images, labels)
    padding = -len(labels) % pad_to
    if pad_to > 1:
        weights = np.concatenate([np.ones(len(labels)), np.zeros(padding)]).astype("float32")
        tensors = (np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)]),
                   np.concatenate([labels, np.zeros(padding, labels.dtype)]), weights)
    dataset = tf.data.Dataset.from_tensor_slices(tensors)
    shape = images.shape[1:]
    if seed is not None:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        if augmentation != "none":
            # One stateless seed pair per image, new every epoch.
            seeds = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
            dataset = tf.data.Dataset.zip(dataset, seeds.batch(2))

            def augment(example, pair):
                image, label = example
                crop_seed, flip_seed = tf.unstack(tf.random.split(pair, 2))
                image = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]])
                image = tf.image.stateless_random_crop(image, shape, seed=crop_seed)
                if augmentation == "crop_flip":
                    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
                return image, label

            dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder).map(
        lambda x, *rest: (tf.cast(x, tf.float32), *rest),
        num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def load_splits(config):
    """The data a run of `config` trains and evaluates on.

    Args:
        config: a `Config` (its dataset, data source and directory, example
            counts and seed).

    Returns:
        `(dataset, (train_images, train_labels), (test_images,
        test_labels))`: the loaded `pde_keras.data.Dataset` and the seeded
        subsets of its splits that `train_and_evaluate` uses (uint8 pixels).
    """
    dataset = data.load(
        config.dataset, config.data_source, config.data_dir, download=config.download,
        synthetic_sizes=(config.train_examples or 2048, config.test_examples or 512),
    )
    rng = np.random.default_rng(config.seed)
    train = subset(dataset.train_images, dataset.train_labels, config.train_examples,
                    "train_examples", rng)
    test = subset(dataset.test_images, dataset.test_labels, config.test_examples,
                   "test_examples", rng)
    return dataset, train, test


def subset(images, labels, count, name, rng):
    """A seeded random subset of `count` examples (all when 0), order kept."""
    if not count:
        return images, labels
    if count > len(labels):
        raise validation.invalid(
            name, f"0 (all) or at most {len(labels)} (the split's size)", count)
    index = np.sort(rng.permutation(len(labels))[:count])
    return images[index], labels[index]
