"""The measure scripts' forward passes (measure/forward.py): the logits of every member come back
to the host in one copy per eval set, whatever its length (tests/host_reads.py)."""
import torch

from measure.forward import split_logits
from tests.fixtures import random_image_dataset, resnet_sam_member
from tests.host_reads import count_host_reads


def test_split_logits_read_the_host_once_per_split():
    model, _ = resnet_sam_member()
    model.eval()
    for n in (8, 16):
        subset = random_image_dataset(n, augment=False)
        with count_host_reads() as reads:
            logits = split_logits([model, model], subset, 8, "cpu")
        assert dict(reads.counts) == {"_to_copy[to host]": 1}
        # Both members' logits equal one plain forward pass of the images, standardised by hand.
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (subset.mean, subset.std))
        images = (torch.from_numpy(subset.images).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            expected = model(images).numpy()
        assert logits.shape == (2, n, 10)
        for member_logits in logits:
            torch.testing.assert_close(torch.as_tensor(member_logits), torch.as_tensor(expected), rtol=1e-5,
                                       atol=1e-5)
