"""The corruption functions (data/corruptions.py): bad arguments refused, the output a pure function of
(images, name, severity, seed) that leaves numpy's global RNG alone, other image sizes handled.
(How strongly each severity distorts the digits is in tests/test_digits.py.)"""
import numpy as np
import pytest

from data.corruptions import CORRUPTIONS, corrupt


def test_corrupt_rejects_bad_arguments(digits_clean_test):
    images = digits_clean_test[0][:4]
    with pytest.raises(ValueError, match="gaussian_noise.*jpeg_compression"):
        corrupt(images, "speckle_noise", 1, 0)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="1, 2, 3, 4, 5"):
            corrupt(images, "fog", severity, 0)
    with pytest.raises(ValueError):
        corrupt(images.astype(np.float32), "fog", 1, 0)
    with pytest.raises(ValueError):
        corrupt(images[..., 0], "fog", 1, 0)


def test_corrupt_is_deterministic_and_leaves_global_rng_alone(digits_clean_test):
    images = digits_clean_test[0][:16]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    for name in CORRUPTIONS:
        first = corrupt(images, name, 3, 7)
        np.testing.assert_array_equal(first, corrupt(images, name, 3, 7))
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    # seeded corruptions really use the seed
    for name in ("gaussian_noise", "glass_blur", "snow", "frost", "fog", "elastic_transform", "pixelate"):
        assert not np.array_equal(corrupt(images, name, 3, 7), corrupt(images, name, 3, 8)), name


@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (2, 7, 9, 3)])
def test_corrupt_keeps_the_shape_and_changes_images_of_other_sizes(shape):
    images = np.random.RandomState(1).randint(0, 256, size=shape).astype(np.uint8)
    for name in CORRUPTIONS:
        for severity in (1, 5):
            out = corrupt(images, name, severity, 11)
            assert out.shape == shape and out.dtype == np.uint8, name
            assert not np.array_equal(out, images), (name, severity)
