"""DCGAN-style generator and discriminator (Radford et al. 2016) and a small CNN classifier, as torch modules.

Images are ``(N, 3, S, S)`` float tensors in ``[-1, 1]`` with ``S = 4 * 2**n_up`` (32 for the defaults);
latents are ``(N, nz)`` standard normal. Each module's constructor arguments are its ``config`` (a dict of
ints), stored as safetensors metadata next to the weights (:mod:`rebalance.fairgan.io`) so a checkpoint
rebuilds its module without pickle.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

__all__ = ["Generator", "Discriminator", "SmallConvNet", "init_dcgan_weights"]


def _check_size(image_size: int) -> int:
    """Number of 2x up/down-sampling steps between 4x4 and ``image_size`` (a power of two >= 8)."""
    n = int(round(math.log2(image_size))) - 2
    if image_size < 8 or 4 * 2**n != image_size:
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    return n


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), batch-norm scales N(1, 0.02) and shifts 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """``z (N, nz) -> images (N, 3, image_size, image_size)`` in [-1, 1].

    A 4x4 transposed convolution to ``ngf * 2**(n_up - 1)`` channels, then ``n_up`` stride-2 transposed
    convolutions (batch norm + ReLU between them) halving the channels each time, tanh at the end.
    """

    def __init__(self, nz: int = 64, ngf: int = 32, image_size: int = 32) -> None:
        super().__init__()
        n_up = _check_size(image_size)
        self.config = {"nz": int(nz), "ngf": int(ngf), "image_size": int(image_size)}
        self.nz, self.image_size = int(nz), int(image_size)
        ch = ngf * 2 ** (n_up - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz, ch, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(True),
        ]
        for i in range(n_up):
            last = i == n_up - 1
            out = 3 if last else ch // 2
            layers.append(nn.ConvTranspose2d(ch, out, 4, 2, 1, bias=last))
            if not last:
                layers += [nn.BatchNorm2d(out), nn.ReLU(True)]
            ch = out
        layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)

    def forward(self, z: Tensor) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.nz:
            raise ValueError(f"expected latents of shape (N, {self.nz}), got {tuple(z.shape)}")
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """``images (N, 3, S, S) -> logits (N,)``: real vs generated.

    ``n_down`` stride-2 convolutions with LeakyReLU(0.2) (batch norm from the second on) doubling the
    channels from ``ndf``, then a 4x4 convolution to one logit.
    """

    def __init__(self, ndf: int = 32, image_size: int = 32) -> None:
        super().__init__()
        n_down = _check_size(image_size)
        self.config = {"ndf": int(ndf), "image_size": int(image_size)}
        layers: list[nn.Module] = []
        ch_in, ch = 3, ndf
        for i in range(n_down):
            layers.append(nn.Conv2d(ch_in, ch, 4, 2, 1, bias=i == 0))
            if i > 0:
                layers.append(nn.BatchNorm2d(ch))
            layers.append(nn.LeakyReLU(0.2, True))
            ch_in, ch = ch, ch * 2
        layers.append(nn.Conv2d(ch_in, 1, 4, 1, 0))
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten()


class SmallConvNet(nn.Module):
    """A small CNN classifier ``images (N, 3, S, S) in [-1, 1] -> logits (N, num_classes)``.

    Three conv(3x3) + batch norm + ReLU + 2x2 max-pool blocks (``width``, ``2 width``, ``4 width``
    channels), global average pooling, a linear layer. The default architecture of the ``torch``
    classifier kind (``rebalance.fairgan.classifiers``).
    """

    def __init__(self, num_classes: int, width: int = 32, image_size: int = 32) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.config = {"num_classes": int(num_classes), "width": int(width), "image_size": int(image_size)}
        self.input_size = int(image_size)
        layers: list[nn.Module] = []
        ch_in = 3
        for ch in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(ch_in, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
            layers.append(nn.MaxPool2d(2))
            ch_in = ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))
