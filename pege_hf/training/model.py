"""Building the model a run trains: a saved checkpoint (float, made ready for QAT) or a fresh CIFAR net."""

from __future__ import annotations

import os

from torch import nn

from ..config import PEGEConfig
from ..hf.cifar import cifar_resnet, cifar_vgg_small
from ..hf.loading import from_pretrained
from ..quant.modules import FakeQuantizer, QuantLayer
from ..sources import check_model_source

ARCHS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg_small")


def use_kernels(quant_config: PEGEConfig | None, compile_kernels: bool, log) -> None:
    """`--compile-kernels`: the quantizers' kernels through torch.compile for a QAT run. PEGE with Bernoulli
    activation masks (`--a-mask bernoulli`) is told that counter masks (the default, "auto", under compiled kernels)
    are the fast choice there."""
    if quant_config is None or not compile_kernels:
        return
    from ..quant.kernels import use_compiled_kernels

    use_compiled_kernels(True)
    if quant_config.estimator == "pege" and quant_config.a_mask == "bernoulli":
        log("--compile-kernels with PEGE and --a-mask bernoulli: counter masks (`--a-mask auto`, the default, or "
            "`counter`) are computed inside the compiled kernels (no mask stored or drawn per element; "
            "benchmarks/speed_compiled.md)")


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds PEGE quant layers."""
    return any(isinstance(m, (QuantLayer, FakeQuantizer)) for m in model.modules())


def load_model(source: str | os.PathLike, quant_config: PEGEConfig | None = None, **kwargs) -> nn.Module:
    """A saved image classifier (local folder or Hub id), float or PEGE; with ``quant_config`` a float
    checkpoint comes back ready for QAT. The one place training and evaluation load a checkpoint."""
    return from_pretrained(check_model_source(source), quantization_config=quant_config, **kwargs)


def build_model(arch: str, class_names: list[str], num_channels: int = 3) -> nn.Module:
    """A freshly initialised CIFAR model whose head matches ``class_names``."""
    if arch.startswith("resnet") and arch in ARCHS:
        return cifar_resnet(int(arch[len("resnet"):]), labels=class_names, num_channels=num_channels)
    if arch == "vgg_small":
        return cifar_vgg_small(labels=class_names, num_channels=num_channels)
    raise ValueError(f"--arch must be one of {', '.join(ARCHS)}; got {arch!r}")


def model_input_spec(model: nn.Module) -> tuple[int, int]:
    """(channels, image size) the model expects, from its config (default 3 x 32)."""
    config = model.config
    channels = int(getattr(config, "num_channels", 3) or 3)
    size = getattr(config, "image_size", 32) or 32
    return channels, int(size if isinstance(size, int) else size[0])


def normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the input normalisation: CIFAR-10's for colour images, (0.5, 0.25) for grey ones."""
    from ..data import CIFAR10_MEAN, CIFAR10_STD

    return (CIFAR10_MEAN, CIFAR10_STD) if channels == 3 else ((0.5,), (0.25,))
