"""The CryoDDM network: Topaz-Denoise's UDenoiseNet exactly as the original trains it.

973,201 parameters and the original's `state_dict` keys and shapes (`enc1.0.weight` …
`dec1.4.bias`), so the original's checkpoints load into it. Input 1×H×W with H, W multiples of 32
(five 2× poolings); output the same size, linear (no activation), predicting the image itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = {"name": "UDenoiseNet", "nf": 48, "base_width": 11, "top_width": 3}
STRIDE = 32  # the network pools five times


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class UDenoiseNet(nn.Module):
    """Encoder: 11×11 then five 3×3 stages with max-pooling; decoder: nearest upsampling and
    concatenation with the skips; the input itself joins at the top (as in the original CryoDDM
    program's unet2d.py)."""

    def __init__(self, nf: int = 48, base_width: int = 11, top_width: int = 3) -> None:
        super().__init__()
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.enc1 = nn.Sequential(_conv(1, nf, base_width), act(), nn.MaxPool2d(2))
        self.enc2 = nn.Sequential(_conv(nf, nf, 3), act(), nn.MaxPool2d(2))
        self.enc3 = nn.Sequential(_conv(nf, nf, 3), act(), nn.MaxPool2d(2))
        self.enc4 = nn.Sequential(_conv(nf, nf, 3), act(), nn.MaxPool2d(2))
        self.enc5 = nn.Sequential(_conv(nf, nf, 3), act(), nn.MaxPool2d(2))
        self.enc6 = nn.Sequential(_conv(nf, nf, 3), act())
        self.dec5 = nn.Sequential(_conv(2 * nf, 2 * nf, 3), act(), _conv(2 * nf, 2 * nf, 3), act())
        self.dec4 = nn.Sequential(_conv(3 * nf, 2 * nf, 3), act(), _conv(2 * nf, 2 * nf, 3), act())
        self.dec3 = nn.Sequential(_conv(3 * nf, 2 * nf, 3), act(), _conv(2 * nf, 2 * nf, 3), act())
        self.dec2 = nn.Sequential(_conv(3 * nf, 2 * nf, 3), act(), _conv(2 * nf, 2 * nf, 3), act())
        self.dec1 = nn.Sequential(
            _conv(2 * nf + 1, 64, top_width), act(), _conv(64, 32, top_width), act(), _conv(32, 1, top_width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1 = self.enc1(x)
        p2 = self.enc2(p1)
        p3 = self.enc3(p2)
        p4 = self.enc4(p3)
        p5 = self.enc5(p4)
        h = self.enc6(p5)
        h = self.dec5(torch.cat([F.interpolate(h, size=p4.shape[-2:], mode="nearest"), p4], 1))
        h = self.dec4(torch.cat([F.interpolate(h, size=p3.shape[-2:], mode="nearest"), p3], 1))
        h = self.dec3(torch.cat([F.interpolate(h, size=p2.shape[-2:], mode="nearest"), p2], 1))
        h = self.dec2(torch.cat([F.interpolate(h, size=p1.shape[-2:], mode="nearest"), p1], 1))
        h = self.dec1(torch.cat([F.interpolate(h, size=x.shape[-2:], mode="nearest"), x], 1))
        return h
