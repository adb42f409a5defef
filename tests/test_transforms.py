"""The batched augmentation (data/transforms.py): every augmented image is one of the crops and
flips of its zero-padded input, found by a brute-force search over all of them."""
import numpy as np
import torch

from data.transforms import random_crop_flip


def test_random_crop_flip_produces_only_valid_crops():
    # Brute force: every output must equal one of the (2p+1)^2 x 2 crops of the zero-padded input.
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(16, 3, 6, 6)).astype(np.uint8)
    out = random_crop_flip(torch.from_numpy(images), 2, True, torch.Generator().manual_seed(0)).numpy()
    seen_offsets, seen_flips = set(), set()
    for image, result in zip(images, out):
        padded = np.pad(image, ((0, 0), (2, 2), (2, 2)))
        matches = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (False, True)
                   if np.array_equal(result, (padded[:, dy:dy + 6, dx:dx + 6][:, :, ::-1] if flip
                                              else padded[:, dy:dy + 6, dx:dx + 6]))]
        assert matches, "augmented image is not a crop of the padded input"
        seen_offsets.add(matches[0][:2])
        seen_flips.add(matches[0][2])
    assert len(seen_offsets) > 4 and seen_flips == {False, True}
