"""The models the command line trains: the demo's small CNN, reused by ``fused-sam bench --e2e``.

Both commands build their network here, so that the benchmark never imports the demo (and the
library never imports either).
"""

from __future__ import annotations

from torch import nn

__all__ = ["e2e_model", "make_model"]


def make_model(in_channels: int, num_classes: int, width: int = 16) -> nn.Module:
    """A small CNN with BatchNorm: four conv+BN+ReLU blocks, global average pooling, a linear head.

    ``width`` channels in the first two blocks, twice that after the 2x2 max-pool. With the
    default width and 8x8 digits it has 17k parameters: enough to memorise noisy labels.
    """

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]

    return nn.Sequential(
        *block(in_channels, width),
        *block(width, width),
        nn.MaxPool2d(2),
        *block(width, 2 * width),
        *block(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def e2e_model(width: int = 64, classes: int = 10) -> nn.Module:
    """The end-to-end benchmark's model: the demo's CNN on 3-channel images."""
    return make_model(3, classes, width)
