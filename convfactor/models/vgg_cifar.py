"""VGG-16 for CIFAR (Simonyan & Zisserman 2015, adapted to 32x32 inputs with BatchNorm).

13 conv3x3 (+BN+ReLU) layers of widths 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M and a single FC layer
512 -> classes, the CIFAR variant compressed in Li et al. (2019/2020) Table 5 (14.73 M params,
313.7 M MACs at 32x32).
"""
from __future__ import annotations

import torch
from torch import nn

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGGCifar(nn.Module):
    """Input (B, 3, 32, 32) -> logits (B, num_classes)."""

    def __init__(self, cfg=VGG16_CFG, num_classes: int = 10):
        super().__init__()
        layers, in_ch = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def vgg16_cifar(num_classes: int = 10) -> VGGCifar:
    return VGGCifar(VGG16_CFG, num_classes)
