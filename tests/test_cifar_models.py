"""CIFAR ResNet / VGG-small as registered transformers models (pege_hf.hf.cifar)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification

from pege_hf.hf.cifar import (
    CIFAR10_LABELS,
    CifarResNetConfig,
    CifarResNetForImageClassification,
    CifarVGGConfig,
    CifarVGGForImageClassification,
    cifar_resnet,
    cifar_vgg_small,
    register_cifar_models,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def option_a_resnet_params(depth: int, num_labels: int = 10, width: int = 16) -> int:
    """Count from the paper's description: 3x3 convs without bias, BN (gamma, beta) after each,
    parameter-free option-A shortcuts, a Linear head on the 4*width pooled features."""
    n = (depth - 2) // 6
    conv3x3 = lambda cin, cout: 9 * cin * cout  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv3x3(3, width) + bn(width)
    cin = width
    for cout in (width, 2 * width, 4 * width):
        for _ in range(n):
            total += conv3x3(cin, cout) + bn(cout) + conv3x3(cout, cout) + bn(cout)
            cin = cout
    return total + cin * num_labels + num_labels


def vgg_small_params(num_labels: int = 10) -> int:
    widths = [3, 128, 128, 256, 256, 512, 512]
    convs = sum(9 * a * b + 2 * b for a, b in zip(widths, widths[1:]))
    return convs + 512 * 4 * 4 * num_labels + num_labels


# ResNet-20 has 0.27 M parameters (He et al. 2016, table 6). With option-A shortcuts the exact
# counts are 269,722 (ResNet-20) and 853,018 (ResNet-56); 272,474 and 855,770 are the option-B
# counts (1x1 projection conv + BN on the two downsampling shortcuts, 2,752 more parameters).
@pytest.mark.parametrize("depth, expected", [(20, 269_722), (56, 853_018)])
def test_resnet_parameter_count(depth, expected):
    assert option_a_resnet_params(depth) == expected
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=depth))
    assert n_params(model) == expected


def test_resnet_default_config_has_ten_labels_and_resnet20():
    config = CifarResNetConfig()
    assert config.depth == 20 and config.num_labels == 10
    assert CifarResNetConfig(num_labels=100).num_labels == 100


@pytest.mark.parametrize("depth", [19, 21, 2, 0, -4, 20.0, "20"])
def test_invalid_depth_raises(depth):
    with pytest.raises(ValueError, match="depth"):
        CifarResNetConfig(depth=depth)


def test_logits_shape_and_loss_is_cross_entropy():
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 3, 9, 1])
    out = model(pixel_values=x, labels=labels)
    assert out.logits.shape == (4, 10)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert model(x).loss is None
    loss, logits = model(x, labels=labels, return_dict=False)
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(loss, out.loss)


def test_loss_backpropagates_to_the_stem():
    model = cifar_resnet(20)
    model(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 2])).loss.backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def _weight_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("make", [lambda: cifar_resnet(20), cifar_vgg_small])
def test_registration_order_follows_execution_order(make):
    model = make()
    layers = _weight_layers(model)
    assert layers[-1][0] == "classifier" and isinstance(layers[-1][1], nn.Linear)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for _, m in layers)
    assert all(m.bias is None for _, m in layers[:-1])

    # The order of first use in a forward pass equals the registration order.
    used = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: used.append(name)) for name, m in layers]
    model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert used == [name for name, _ in layers]


def test_resnet_stem_is_first_and_relus_are_modules():
    model = cifar_resnet(20)
    first_name, first = _weight_layers(model)[0]
    assert first is model.conv1 and first.in_channels == 3 and first.out_channels == 16
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 9
    assert not any(r.inplace for r in relus)


def test_vgg_small_forward_and_size():
    model = cifar_vgg_small()
    assert model.config.layers == [128, 128, "M", 256, 256, "M", 512, 512, "M"]
    assert model.classifier.in_features == 512 * 4 * 4
    assert n_params(model) == vgg_small_params()
    assert _weight_layers(model)[0][1].in_channels == 3
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 10)


def test_vgg_config_validation():
    assert CifarVGGConfig(layers=[8, "M", 16, "M"]).num_labels == 10
    with pytest.raises(ValueError, match="layers"):
        CifarVGGConfig(layers=[8, "X"])
    with pytest.raises(ValueError, match="image_size"):
        CifarVGGConfig(layers=[8, "M"] * 6)


def test_register_twice_is_fine():
    register_cifar_models()
    register_cifar_models()
    assert isinstance(AutoConfig.for_model("pege_cifar_resnet"), CifarResNetConfig)
    assert isinstance(AutoConfig.for_model("pege_cifar_vgg"), CifarVGGConfig)


@pytest.mark.parametrize(
    "make, model_cls",
    [
        (lambda: cifar_resnet(20), CifarResNetForImageClassification),
        (lambda: cifar_vgg_small(layers=[16, "M", 32, "M"]), CifarVGGForImageClassification),
    ],
)
def test_save_and_auto_load_round_trip(tmp_path, make, model_cls):
    register_cifar_models()
    torch.manual_seed(0)
    model = make()
    # Make BN running stats non-trivial so that buffers are part of what is checked.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    model.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is model.config_class
    assert config.id2label[3] == "cat" and config.label2id["truck"] == 9

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is model_cls
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_from_config_and_reinitialised_head_are_properly_initialised(tmp_path):
    register_cifar_models()
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(CifarResNetConfig(depth=20))
    assert isinstance(model, CifarResNetForImageClassification)
    conv = model.layer3[0].conv2.weight
    expected_std = (2.0 / (conv.shape[0] * 9)) ** 0.5  # kaiming normal, fan_out, relu
    assert abs(conv.std().item() / expected_std - 1) < 0.05
    assert torch.equal(model.bn1.weight, torch.ones(16)) and torch.equal(model.bn1.bias, torch.zeros(16))

    # A head whose size does not match the checkpoint is built on the meta device and must be
    # initialised by _init_weights (not left as uninitialised memory).
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(
        tmp_path, num_labels=100, ignore_mismatched_sizes=True
    )
    assert loaded.classifier.weight.shape == (100, 64)
    bound = 1 / 64**0.5
    assert loaded.classifier.weight.abs().max() <= bound and loaded.classifier.bias.abs().max() <= bound
    assert loaded.classifier.weight.std() > bound / 4
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)


def test_cifar10_labels():
    assert len(CIFAR10_LABELS) == 10 and CIFAR10_LABELS[0] == "airplane" and CIFAR10_LABELS[-1] == "truck"
