"""Pretrained VGG-16 weights from PyTorch-layout safetensors and Keras HDF5 files, checked
against an independent NumPy VGG-16 in each framework's own layout."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models.imported import (
    WeightsFormatError,
    vgg16_from_keras,
    vgg16_from_safetensors,
)

safetensors_numpy = pytest.importorskip("safetensors.numpy")
h5py = pytest.importorskip("h5py")

# A narrow VGG-16 (13 convs in five stages, two hidden dense layers), 5 classes.
STAGES = ((4, 4), (6, 6), (8, 8, 8), (8, 8, 8), (8, 8, 8))
HIDDEN = (16, 12)
CLASSES = 5
RNG = np.random.default_rng(0)
IMAGES_NCHW = RNG.normal(size=(2, 3, 224, 224)).astype(np.float32)


def conv_widths():
    return [w for stage in STAGES for w in stage]


def random_torch_layers():
    """(out, in, 3, 3) conv kernels and (out, in) dense weights, PyTorch's layout."""
    convs, inputs = [], 3
    for width in conv_widths():
        scale = np.sqrt(2.0 / (9 * inputs))
        convs.append((RNG.normal(0, scale, (width, inputs, 3, 3)), RNG.normal(0, 0.1, width)))
        inputs = width
    dense, inputs = [], inputs * 49
    for width in (*HIDDEN, CLASSES):
        dense.append(
            (RNG.normal(0, np.sqrt(2.0 / inputs), (width, inputs)), RNG.normal(0, 0.1, width))
        )
        inputs = width
    return convs, dense


def numpy_vgg_nchw(images, convs, dense):
    """VGG-16 in NCHW with PyTorch-layout weights: conv3x3 pad 1 + ReLU, 2x2 max pool after
    each stage, flatten (c, h, w), dense + ReLU twice, logits."""
    x = images.astype(np.float64)
    layer = 0
    for stage in STAGES:
        for _ in stage:
            kernel, bias = convs[layer]
            padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
            windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
            x = np.einsum("nchwij,ocij->nohw", windows, kernel) + bias[None, :, None, None]
            x = np.maximum(x, 0)
            layer += 1
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    x = x.reshape(x.shape[0], -1)
    for index, (weight, bias) in enumerate(dense):
        x = x @ weight.T + bias
        if index < len(dense) - 1:
            x = np.maximum(x, 0)
    return x


def run(module, variables):
    images = jnp.asarray(np.transpose(IMAGES_NCHW, (0, 2, 3, 1)))
    return np.asarray(module.apply(variables, images, train=False))


@pytest.fixture(scope="module")
def torch_layers():
    return random_torch_layers()


@pytest.fixture(scope="module")
def reference(torch_layers):
    return numpy_vgg_nchw(IMAGES_NCHW, *torch_layers)


def torchvision_file(path, convs, dense):
    tensors, index = {}, 0
    for stage in STAGES:
        for _ in stage:
            kernel, bias = convs.pop(0)
            tensors[f"features.{index}.weight"] = kernel
            tensors[f"features.{index}.bias"] = bias
            index += 2  # conv, ReLU
        index += 1  # max pool
    for position, (weight, bias) in zip((0, 3, 6), dense, strict=True):
        tensors[f"classifier.{position}.weight"] = weight
        tensors[f"classifier.{position}.bias"] = bias
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    safetensors_numpy.save_file(tensors, str(path))
    return tensors


def test_a_torchvision_vgg16_gives_the_same_logits(tmp_path, torch_layers, reference):
    convs, dense = torch_layers
    torchvision_file(tmp_path / "vgg16.safetensors", list(convs), dense)
    module, variables = vgg16_from_safetensors(tmp_path / "vgg16.safetensors")
    assert module.full_widths()["conv13"] == 8 and module.num_classes == CLASSES
    np.testing.assert_allclose(run(module, variables), reference, rtol=1e-4, atol=1e-4)


def test_a_timm_vgg16_with_convolutional_pre_logits_gives_the_same_logits(
    tmp_path, torch_layers, reference
):
    convs, dense = torch_layers
    # timm: the same feature indices; fc1 a 7x7 conv, fc2 a 1x1 conv, head.fc a dense layer.
    tensors = {}
    index, layer = 0, 0
    for stage in STAGES:
        for _ in stage:
            tensors[f"features.{index}.weight"], tensors[f"features.{index}.bias"] = convs[layer]
            index, layer = index + 2, layer + 1
        index += 1
    (w1, b1), (w2, b2), (w3, b3) = dense
    tensors["pre_logits.fc1.weight"] = w1.reshape(w1.shape[0], 8, 7, 7)
    tensors["pre_logits.fc1.bias"] = b1
    tensors["pre_logits.fc2.weight"] = w2[:, :, None, None]
    tensors["pre_logits.fc2.bias"] = b2
    tensors["head.fc.weight"], tensors["head.fc.bias"] = w3, b3
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    safetensors_numpy.save_file(tensors, str(tmp_path / "timm.safetensors"))
    module, variables = vgg16_from_safetensors(tmp_path / "timm.safetensors")
    np.testing.assert_allclose(run(module, variables), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kernel_name, bias_name", [("{}/kernel:0", "{}/bias:0"), ("{}_W_1:0", "{}_b_1:0")]
)
def test_a_keras_vgg16_gives_the_same_logits(
    tmp_path, torch_layers, reference, kernel_name, bias_name
):
    """Keras layers are channels-last: kernels (3, 3, in, out), dense (in, out) with the
    flatten in (h, w, c) order; written in the Keras 2 HDF5 weights layout."""
    convs, dense = torch_layers
    path = tmp_path / "vgg16.h5"
    names = [
        f"block{s + 1}_conv{i + 1}" for s, stage in enumerate(STAGES) for i in range(len(stage))
    ]
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = [n.encode() for n in (*names, "fc1", "fc2", "predictions")]
        for name, (kernel, bias) in zip(names, convs, strict=True):
            group = file.create_group(name)
            k, b = kernel_name.format(name), bias_name.format(name)
            group.attrs["weight_names"] = [k.encode(), b.encode()]
            group[k] = np.transpose(kernel, (2, 3, 1, 0)).astype(np.float32)
            group[b] = bias.astype(np.float32)
        for index, (name, (weight, bias)) in enumerate(
            zip(("fc1", "fc2", "predictions"), dense, strict=True)
        ):
            kernel = weight.T
            if index == 0:  # rows from (c, h, w) to Keras' channels-last (h, w, c) flatten
                kernel = (
                    weight.reshape(-1, 8, 7, 7).transpose(2, 3, 1, 0).reshape(-1, weight.shape[0])
                )
            group = file.create_group(name)
            k, b = kernel_name.format(name), bias_name.format(name)
            group.attrs["weight_names"] = [k.encode(), b.encode()]
            group[k] = kernel.astype(np.float32)
            group[b] = bias.astype(np.float32)
    module, variables = vgg16_from_keras(path)
    np.testing.assert_allclose(run(module, variables), reference, rtol=1e-4, atol=1e-4)


def test_other_files_are_refused_by_name(tmp_path, torch_layers):
    convs, dense = torch_layers
    tensors = torchvision_file(tmp_path / "ok.safetensors", list(convs), dense)
    with_bn = dict(tensors, **{"features.1.running_mean": np.zeros(4, np.float32)})
    safetensors_numpy.save_file(with_bn, str(tmp_path / "bn.safetensors"))
    with pytest.raises(WeightsFormatError, match="vgg16_bn"):
        vgg16_from_safetensors(tmp_path / "bn.safetensors")
    headless = {k: v for k, v in tensors.items() if not k.startswith("classifier")}
    safetensors_numpy.save_file(headless, str(tmp_path / "headless.safetensors"))
    with pytest.raises(WeightsFormatError, match="not a torchvision or timm vgg16"):
        vgg16_from_safetensors(tmp_path / "headless.safetensors")
    short = {k: v for k, v in tensors.items() if k not in ("features.0.weight", "features.0.bias")}
    safetensors_numpy.save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(WeightsFormatError, match="12 convolutions"):
        vgg16_from_safetensors(tmp_path / "short.safetensors")
    cifar = dict(tensors, **{"classifier.0.weight": np.zeros((16, 8), np.float32)})
    safetensors_numpy.save_file(cifar, str(tmp_path / "cifar.safetensors"))
    with pytest.raises(WeightsFormatError, match="first dense layer reads 392 inputs"):
        vgg16_from_safetensors(tmp_path / "cifar.safetensors")
    wrong = dict(tensors, **{"classifier.3.weight": np.zeros((12, 15), np.float32)})
    safetensors_numpy.save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(WeightsFormatError, match="fc2 reads 15 inputs"):
        vgg16_from_safetensors(tmp_path / "wrong.safetensors")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(WeightsFormatError, match="no layer 'block1_conv1'"):
        vgg16_from_keras(tmp_path / "empty.h5")


TORCH_SCRIPT = """
import sys
import numpy as np
import torch
from safetensors.numpy import save_file

torch.manual_seed(0)
stages, hidden, classes = {stages}, {hidden}, {classes}
layers, inputs = [], 3
for stage in stages:
    for width in stage:
        layers += [torch.nn.Conv2d(inputs, width, 3, padding=1), torch.nn.ReLU(inplace=True)]
        inputs = width
    layers.append(torch.nn.MaxPool2d(2, 2))
features = torch.nn.Sequential(*layers)
classifier = torch.nn.Sequential(
    torch.nn.Linear(inputs * 49, hidden[0]), torch.nn.ReLU(True), torch.nn.Dropout(),
    torch.nn.Linear(hidden[0], hidden[1]), torch.nn.ReLU(True), torch.nn.Dropout(),
    torch.nn.Linear(hidden[1], classes),
)
model = torch.nn.Module()
model.features, model.classifier = features, classifier
model.avgpool = torch.nn.AdaptiveAvgPool2d(7)
model.eval()
images = torch.from_numpy(np.load(sys.argv[1]))
with torch.no_grad():
    x = model.avgpool(model.features(images))
    logits = model.classifier(torch.flatten(x, 1))
save_file({{k: v.numpy() for k, v in model.state_dict().items()}}, sys.argv[2])
np.save(sys.argv[3], logits.numpy())
"""


def test_a_pytorch_vgg16_of_torchvisions_layout_gives_the_same_logits(tmp_path):
    """A randomly initialised PyTorch model in torchvision's vgg16 layout (run in its own
    process, so PyTorch never loads into the JAX test process)."""
    import subprocess
    import sys

    try:
        subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        pytest.skip("PyTorch is not installed (the 'compare' extra)")
    np.save(tmp_path / "images.npy", IMAGES_NCHW)
    script = TORCH_SCRIPT.format(stages=STAGES, hidden=HIDDEN, classes=CLASSES)
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "images.npy"),
         str(tmp_path / "vgg16.safetensors"), str(tmp_path / "logits.npy")],
        check=True, timeout=300,
    )  # fmt: skip
    module, variables = vgg16_from_safetensors(tmp_path / "vgg16.safetensors")
    expected = np.load(tmp_path / "logits.npy")
    np.testing.assert_allclose(run(module, variables), expected, rtol=1e-4, atol=1e-5)


def test_the_command_writes_a_model_file_that_loads_with_the_same_logits(
    tmp_path, torch_layers, reference, capsys
):
    from jaxprune import checkpoint
    from jaxprune.cli import main

    convs, dense = torch_layers
    torchvision_file(tmp_path / "vgg16.safetensors", list(convs), dense)
    out = tmp_path / "vgg16_imagenet.msgpack"
    assert main(["import-weights", str(tmp_path / "vgg16.safetensors"), "--out", str(out)]) == 0
    assert "vgg16, 5 classes" in capsys.readouterr().out
    module, variables, meta = checkpoint.load_model_file(out)
    assert meta["input_shape"] == [224, 224, 3] and "torchvision" in meta["format"]
    np.testing.assert_allclose(run(module, variables), reference, rtol=1e-4, atol=1e-4)
    assert main(["import-weights", str(tmp_path / "missing.pth"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "vgg16.pth").write_bytes(b"x")
    assert main(["import-weights", str(tmp_path / "vgg16.pth"), "--out", str(out)]) == 1
    assert "give a .safetensors file" in capsys.readouterr().err
