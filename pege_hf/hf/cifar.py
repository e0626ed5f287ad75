"""CIFAR ResNet (He et al. 2016, option-A shortcuts) and VGG-small as transformers models.

Both are ordinary `PreTrainedModel`s with their own config classes, so once
`register_cifar_models()` has run, `AutoConfig` and `AutoModelForImageClassification`
save and load them like any Hub model, without `trust_remote_code`.

Layout conventions that the quantizer relies on:
- every convolution is a plain `nn.Conv2d` (bias=False) and the head a plain `nn.Linear`
  named `classifier`;
- modules are registered in execution order, so the stem conv is the first and
  `classifier` the last Conv2d/Linear in `named_modules()`;
- every ReLU is a (non-inplace) `nn.ReLU` module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

__all__ = [
    "CIFAR10_LABELS",
    "VGG_SMALL_LAYERS",
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "CifarVGGConfig",
    "CifarVGGForImageClassification",
    "cifar_resnet",
    "cifar_vgg_small",
    "register_cifar_models",
]

CIFAR10_LABELS = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# "M" is a 2x2 max-pool; an int is a 3x3 conv with that many output channels (+ BN + ReLU).
VGG_SMALL_LAYERS = (128, 128, "M", 256, 256, "M", 512, 512, "M")

_DEFAULT_NUM_LABELS = 10


# --------------------------------------------------------------------------- configs


def _default_to_ten_labels(config: PretrainedConfig, kwargs: dict) -> None:
    """transformers defaults to 2 labels; CIFAR models default to 10."""
    if config.id2label is None:
        kwargs.setdefault("num_labels", _DEFAULT_NUM_LABELS)


class CifarResNetConfig(PretrainedConfig):
    """Config of the CIFAR ResNet of He et al. (2016): depth = 6n + 2 (20, 32, 44, 56, 110).

    Args:
        depth: total number of weight layers, 6n + 2 with n >= 1 basic blocks per stage.
        base_width: channels of the stem and the first stage (stages use 1x, 2x, 4x).
        num_channels: input image channels.
        image_size: input image side (informational; the network pools globally).
        **kwargs: the usual `PretrainedConfig` fields (num_labels, id2label, label2id, ...);
            num_labels defaults to 10.
    """

    model_type = "pege_cifar_resnet"

    depth: int = 20
    base_width: int = 16
    num_channels: int = 3
    image_size: int = 32

    def __post_init__(self, **kwargs):
        depth = self.depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"`depth` must have the form 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {depth!r}"
            )
        _check_positive_ints(self, "base_width", "num_channels", "image_size")
        _default_to_ten_labels(self, kwargs)
        super().__post_init__(**kwargs)

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6


class CifarVGGConfig(PretrainedConfig):
    """Config of the CIFAR "VGG-small" of LQ-Nets / EWGS.

    Args:
        layers: ints are 3x3 conv (+BN+ReLU) widths, "M" a 2x2 max-pool. The default is
            VGG-small: 128, 128, M, 256, 256, M, 512, 512, M (head: 512*4*4 -> num_labels).
        num_channels: input image channels.
        image_size: input image side; must survive the max-pools (divisible by 2**pools).
        **kwargs: the usual `PretrainedConfig` fields; num_labels defaults to 10.
    """

    model_type = "pege_cifar_vgg"

    layers: list[int | str] | tuple[int | str, ...] = VGG_SMALL_LAYERS
    num_channels: int = 3
    image_size: int = 32

    def __post_init__(self, **kwargs):
        self.layers = list(self.layers)
        bad = [x for x in self.layers if x != "M" and (isinstance(x, bool) or not isinstance(x, int) or x < 1)]
        if bad or not any(x != "M" for x in self.layers):
            raise ValueError(
                f"`layers` must hold positive ints (conv widths) and 'M' (max-pool), "
                f"with at least one conv; got {self.layers!r}"
            )
        _check_positive_ints(self, "num_channels", "image_size")
        pools = self.layers.count("M")
        if self.image_size % 2**pools:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by 2**{pools} for {pools} max-pools in `layers`"
            )
        _default_to_ten_labels(self, kwargs)
        super().__post_init__(**kwargs)


def _check_positive_ints(config: PretrainedConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")


# --------------------------------------------------------------------------- building blocks


class CifarShortcutA(nn.Module):
    """Option-A shortcut: parameter-free stride subsampling + zero-padding of the channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.pad}"


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = CifarShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


# --------------------------------------------------------------------------- models


class CifarPreTrainedModel(PreTrainedModel):
    """Shared init and classification output of the CIFAR models.

    Subclasses build their layers, register `self.classifier` last, call `self.post_init()`
    and implement `forward_features(pixel_values) -> (batch, features)`.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization functions skip tensors already loaded from a checkpoint.
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):  # torch's own nn.Linear.reset_parameters
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features) if module.in_features > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            if module.num_batches_tracked is not None:
                init.zeros_(module.num_batches_tracked)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        """Logits of shape (batch, num_labels); loss = cross-entropy when `labels` are given."""
        logits = self.classifier(self.forward_features(pixel_values))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.to(logits.device))
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return (logits,) if loss is None else (loss, logits)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


class CifarResNetForImageClassification(CifarPreTrainedModel):
    """CIFAR ResNet-(6n+2): 3x3 stem (16) + 3 stages of n basic blocks (16/32/64, stride 1/2/2)
    with option-A shortcuts, global average pool, Linear head. ResNet-20: 269,722 parameters."""

    config_class = CifarResNetConfig
    base_model_prefix = "cifar_resnet"
    _no_split_modules = ["CifarBasicBlock"]

    def __init__(self, config: CifarResNetConfig):
        super().__init__(config)
        width, n = config.base_width, config.blocks_per_stage
        self.conv1 = nn.Conv2d(config.num_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(width, width, n, stride=1)
        self.layer2 = self._make_stage(width, 2 * width, n, stride=2)
        self.layer3 = self._make_stage(2 * width, 4 * width, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, config.num_labels)
        self.post_init()

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [CifarBasicBlock(in_channels, out_channels, stride)]
        layers += [CifarBasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(pixel_values)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


class CifarVGGForImageClassification(CifarPreTrainedModel):
    """VGG-small (LQ-Nets / EWGS CIFAR): conv-BN-ReLU stacks with max-pools, then a Linear head."""

    config_class = CifarVGGConfig
    base_model_prefix = "cifar_vgg"

    def __init__(self, config: CifarVGGConfig):
        super().__init__(config)
        layers: list[nn.Module] = []
        channels = config.num_channels
        for spec in config.layers:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += _conv_bn_relu(channels, spec)
                channels = spec
        self.features = nn.Sequential(*layers)
        side = config.image_size // 2 ** config.layers.count("M")
        self.classifier = nn.Linear(channels * side * side, config.num_labels)
        self.post_init()

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(pixel_values), 1)


# --------------------------------------------------------------------------- registration, helpers


def register_cifar_models() -> None:
    """Register both configs with AutoConfig and both models with AutoModelForImageClassification.

    Idempotent: calling it again (e.g. from several imports) is a no-op.
    """
    for config_cls, model_cls in (
        (CifarResNetConfig, CifarResNetForImageClassification),
        (CifarVGGConfig, CifarVGGForImageClassification),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForImageClassification.register(config_cls, model_cls, exist_ok=True)


def _label_maps(labels: Sequence[str]) -> dict:
    return {
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def cifar_resnet(
    depth: int = 20, labels: Sequence[str] = CIFAR10_LABELS, **config_kwargs
) -> CifarResNetForImageClassification:
    """A freshly initialised CIFAR ResNet-`depth` whose labels are `labels` (CIFAR-10 by default)."""
    config = CifarResNetConfig(depth=depth, **_label_maps(labels), **config_kwargs)
    return CifarResNetForImageClassification(config)


def cifar_vgg_small(labels: Sequence[str] = CIFAR10_LABELS, **config_kwargs) -> CifarVGGForImageClassification:
    """A freshly initialised VGG-small whose labels are `labels` (CIFAR-10 by default)."""
    return CifarVGGForImageClassification(CifarVGGConfig(**_label_maps(labels), **config_kwargs))
