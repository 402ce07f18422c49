"""Plain Flax NNX image classifiers that take NHWC images and return logits."""

from archs.flops import count_flops
from archs.registry import available, create, register
from archs.resnet import BasicBlock, Bottleneck, ResNet
from archs.vit import ViT
from archs.wide_resnet import PreActBlock, WideResNet

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PreActBlock",
    "ResNet",
    "ViT",
    "WideResNet",
    "available",
    "count_flops",
    "create",
    "register",
]
