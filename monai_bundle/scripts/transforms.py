"""MONAI transforms specific to CoroNet training."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import MapTransform, RandomizableTransform


class RandFlipUnlessLabeld(RandomizableTransform, MapTransform):
    """Random horizontal and vertical flips, except for images whose label is in ``skip_labels``.

    The authors flipped only non-COVID images (paper section 3.2 and their code); the default
    therefore skips label 2, COVID-19.  Each axis is flipped independently with ``prob``.
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        label_key: str = "label",
        skip_labels: Sequence[int] = (2,),
        prob: float = 0.5,
        spatial_axes: Sequence[int] = (0, 1),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.label_key = label_key
        self.skip_labels = {int(label) for label in skip_labels}
        self.axis_prob = prob
        self.spatial_axes = tuple(spatial_axes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        flips = [ax for ax in self.spatial_axes if self.R.rand() < self.axis_prob]
        if int(torch.as_tensor(d[self.label_key]).item()) in self.skip_labels or not flips:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            # channel-first: spatial axis k is tensor dimension k + 1
            d[key] = torch.flip(torch.as_tensor(image), dims=[ax + 1 for ax in flips])
        return d
