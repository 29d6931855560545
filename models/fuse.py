"""Inference-only rewrites of a trained model: BatchNorm folded into the convolution before it.

`fold_batchnorm(model, example)` returns a new model (the argument is left as it is) in which every
BatchNorm that reads a convolution's output directly, and nothing else reads that output, has been folded
into the convolution (eval-mode statistics: w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps)
+ beta) and replaced by an identity. Pairs are found by running `example` through the model once with hooks
(a norm whose input tensor *is* a convolution's output tensor), so every place a model composes the two counts
alike: the stem and downsample `Sequential`s, the Bottleneck's conv1/bn1 attribute pairs, dilated convolutions,
the heads' conv-norm-activation blocks, the non-local block's output projection. A convolution whose output
is also read by another module (a second consumer in the hooks) keeps its norm; reads outside modules (functional
ops) are not seen, which is why the tests compare predictions of every model family.

The result is eval-only: its `train(True)` raises, since folded statistics cannot be trained or updated.
Predictions equal the original's up to float rounding (tests/test_fuse.py checks every conv kind).
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from models.resnet import FrozenBatchNorm2d
from models.winograd import Workspace, kernel_transform
from models.winograd import conv3x3 as winograd_conv3x3

NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError("this model has its BatchNorms folded into the convolutions (models.fuse): "
                           "it is for inference only; train the original model instead")
    return nn.Module.train(self, False)


def conv_norm_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, norm name) for every norm whose input is exactly a convolution's output tensor, and that
    output has no other consumer among the model's modules. Runs `example` once, eval mode, no grad."""
    produced: dict[int, str] = {}  # id(output tensor) -> conv name
    consumers: dict[int, list[str]] = {}
    norm_input: dict[str, int] = {}
    handles = []
    keep_alive: list[torch.Tensor] = []  # ids stay unique while the probe runs

    def on_conv(name):
        def hook(module, inputs, output):
            produced[id(output)] = name
            keep_alive.append(output)
        return hook

    def on_any(name, is_norm):
        def hook(module, inputs):
            for value in inputs:
                if isinstance(value, torch.Tensor) and id(value) in produced:
                    consumers.setdefault(id(value), []).append(name)
                    if is_norm:
                        norm_input[name] = id(value)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv(name)))
        if name and not list(module.children()):  # leaves: the modules that actually read tensors
            handles.append(module.register_forward_pre_hook(on_any(name, isinstance(module, NORMS))))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    pairs = []
    for norm_name, tensor_id in norm_input.items():
        if consumers.get(tensor_id) == [norm_name]:
            pairs.append((produced[tensor_id], norm_name))
    return pairs


def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    with torch.no_grad():
        scale = norm.weight.double() * (norm.running_var.double() + norm.eps).rsqrt()
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        bias = (bias - norm.running_mean.double()) * scale + norm.bias.double()
        conv.weight.copy_(weight.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, module)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """An eval-only copy of `model` with each BatchNorm that follows a convolution folded into it (see the
    module docstring). `example`: an input the model accepts (a small image is enough: only the graph's shape
    matters). Norms without a convolution straight before them are kept, in eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model)
    for conv_name, norm_name in conv_norm_pairs(folded, example):
        conv, norm = folded.get_submodule(conv_name), folded.get_submodule(norm_name)
        if conv.out_channels != norm.num_features:
            continue
        _fold(conv, norm)
        _set(folded, norm_name, nn.Identity())
    folded.eval()
    for parameter in folded.parameters():
        parameter.requires_grad_(False)
    folded.train = types.MethodType(_eval_only_train, folded)
    return folded


def count_norms(model: nn.Module) -> int:
    """Norm modules left in a model (0 for a plain ResNet / CCNet once folded)."""
    return sum(isinstance(module, NORMS) for module in model.modules())


WINOGRAD_MIN_CHANNELS = 512
# Smallest output side, per dilation phase (ceil(H / d) x ceil(W / d)), that takes the Winograd path at run time;
# smaller maps (sliding windows of a few pixels, small images) take the direct kernel. Timed per convolution at one
# thread on the Intel Xeon here (direct / Winograd): 512 channels at d = 4 0.2-0.4x at 3-8 px, 0.85x at 49 x 49
# (13 px phases), 1.2x at 64 x 64 (16 px phases), 1.4-1.6x at 64 x 128 and above; 256 channels at d = 2 0.7-1.1x at
# every size up to 128 x 256, hence WINOGRAD_MIN_CHANNELS 512 (layer4 and the heads, not layer3).
WINOGRAD_MIN_PHASE_SIDE = 16


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1 convolution whose padding equals its dilation (the "same" 3x3 convolutions of the ResNet
    layers and the CCNet heads, dilated or not) run by `models.winograd.conv3x3`: Winograd F(4x4, 3x3) on
    PyTorch's GEMMs, a quarter of the direct kernel's multiply-adds. Same parameters and state-dict keys as the
    `nn.Conv2d` it replaces; the transformed kernel is a non-persistent buffer, recomputed when the weight is
    changed in place (e.g. by `load_state_dict`). The input may be NCHW or channels_last (the output keeps its
    layout); float32 CPU tensors outside autograd only, anything else takes `nn.Conv2d`'s path. The transforms
    round differently from the direct kernel (~1e-5 of the largest output). `workspace`: scratch memory reused
    across calls, shared by all the Winograd convolutions `use_winograd` puts in one model."""

    def __init__(self, *args, workspace: Workspace | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.workspace = workspace if workspace is not None else Workspace()
        self.register_buffer("transformed", torch.empty(0), persistent=False)
        self._transformed_version: tuple[int, int] | None = None

    def _kernel(self) -> torch.Tensor:
        version = (id(self.weight), self.weight._version)
        if self._transformed_version != version or self.transformed.dtype != self.weight.dtype:
            with torch.no_grad():
                self.transformed = kernel_transform(self.weight)
            self._transformed_version = version
        return self.transformed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return super().forward(x)  # the Winograd path writes into scratch buffers: not differentiable
        dilation = self.dilation[0]
        if min(-(-x.shape[2] // dilation), -(-x.shape[3] // dilation)) < WINOGRAD_MIN_PHASE_SIDE:
            return super().forward(x)  # a small map: the tiles' padding and transforms cost more than they save
        return winograd_conv3x3(x, self._kernel(), self.bias, dilation=self.dilation[0], workspace=self.workspace)


def winograd_eligible(conv: nn.Module) -> bool:
    """Whether `inference_model` runs `conv` through `WinogradConv2d`: a plain 3x3 convolution, stride 1, one
    group, zero padding given as numbers and equal to the dilation (same-size output), and at least
    WINOGRAD_MIN_CHANNELS input channels (ResNet layer4 and the CCNet heads; at run time only maps of at least
    WINOGRAD_MIN_PHASE_SIDE pixels per dilation phase). Timed against PyTorch's kernels (oneDNN's direct
    convolution, NNPACK) at 64x128, batch 1, on the Intel Xeon here: 1.4-1.8x for the dilated 512-channel layer4
    convolutions and 2-2.4x for the heads' 2048 / 2560-channel ones at one thread (NNPACK's F(6x6, 3x3): 1.5x);
    the 256-channel layer3 ones were 0.7-1.1x, and the 64-128 channel convolutions of a ResNet stem, layer1 and
    layer2 are as fast or faster on oneDNN."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.dilation[0] == conv.dilation[1] and tuple(conv.padding) == tuple(conv.dilation)
            and conv.in_channels >= WINOGRAD_MIN_CHANNELS)


def winograd_available() -> bool:
    """Whether `use_winograd` can run here: the implementation is PyTorch's own GEMMs, so on every CPU build."""
    return True


def use_winograd(model: nn.Module) -> int:
    """Replace every `winograd_eligible` convolution of `model` (in place) with a `WinogradConv2d` holding the
    same parameters, all sharing one workspace; returns how many."""
    if not winograd_available():
        return 0
    names = [name for name, module in model.named_modules() if winograd_eligible(module)]
    workspace = Workspace()
    for name in names:
        conv = model.get_submodule(name)
        winograd = WinogradConv2d(conv.in_channels, conv.out_channels, 3, padding=conv.padding,
                                  dilation=conv.dilation, bias=conv.bias is not None, device=conv.weight.device,
                                  dtype=conv.weight.dtype, workspace=workspace)
        with torch.no_grad():
            winograd.weight.copy_(conv.weight)
            if conv.bias is not None:
                winograd.bias.copy_(conv.bias)
        winograd.requires_grad_(False)
        winograd.train(conv.training)
        winograd._kernel()  # transformed once here, not in the first forward
        _set(model, name, winograd)
    return len(names)


class ResidualBottleneck(nn.Module):
    """The eval-only form of a folded `models.resnet.Bottleneck` (same submodules and state-dict keys): its last
    1x1 convolution is accumulated straight into the residual tensor by one GEMM (`addmm_`, beta = 1), then the
    bias and the ReLU are applied in place, instead of writing a fresh output, adding the residual and applying
    the ReLU as three passes over it. The residual is the downsample's output (a fresh tensor) or, with
    `overwrite_input` (set by `fuse_residuals` for a block fed by the block before it in the same layer, whose
    output nothing else reads), the block's input itself. Anything else (a non-float32 or non-CPU input, a layout
    other than contiguous NCHW, an input it may not overwrite) takes the plain Bottleneck formula."""

    def __init__(self, block: nn.Module, *, overwrite_input: bool = False) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample"):
            setattr(self, name, getattr(block, name))
        self.overwrite_input = overwrite_input

    def _fast(self, out: torch.Tensor, identity: torch.Tensor) -> bool:
        conv = self.conv3
        return (isinstance(self.bn3, nn.Identity) and type(conv) is nn.Conv2d and conv.kernel_size == (1, 1)
                and conv.stride == (1, 1) and conv.groups == 1 and conv.padding == (0, 0)
                and out.device.type == "cpu" and out.dtype == identity.dtype == conv.weight.dtype == torch.float32
                and out.is_contiguous() and identity.is_contiguous()
                and not (torch.is_grad_enabled() and (out.requires_grad or identity.requires_grad))
                and identity.shape == (out.shape[0], conv.out_channels, *out.shape[2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        if (identity is not x or self.overwrite_input) and self._fast(out, identity):
            weight = self.conv3.weight.view(self.conv3.out_channels, -1)
            batch, channels = out.shape[:2]
            for index in range(batch):  # identity += W @ out, one GEMM per image
                identity[index].view(weight.shape[0], -1).addmm_(weight, out[index].view(channels, -1))
            if self.conv3.bias is not None:
                identity.add_(self.conv3.bias.view(1, -1, 1, 1))
            return identity.relu_()
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def fuse_residuals(model: nn.Module) -> int:
    """Replace (in place) every folded `Bottleneck` of `model` with a `ResidualBottleneck`; the blocks after the
    first of each layer (`nn.Sequential`) may overwrite their input, the previous block's output. Returns how
    many."""
    from models.resnet import Bottleneck

    count = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for index, (name, child) in enumerate(children):
            if type(child) is Bottleneck and isinstance(child.bn3, nn.Identity):
                fed_by_block = index > 0 and isinstance(children[index - 1][1], (Bottleneck, ResidualBottleneck))
                replacement = ResidualBottleneck(child, overwrite_input=fed_by_block)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                count += 1
    return count


def inference_model(model: nn.Module, example: torch.Tensor, *, channels_last: bool = False,
                    winograd: bool = True, residuals: bool = True) -> nn.Module:
    """The CPU inference form of a trained model: `fold_batchnorm`, with `channels_last` the weights (and, for
    a model with a `channels_last` switch such as models.ccnet.CCNet, the inputs) in channels-last memory, and
    with `winograd` (default) the large 3x3 convolutions on Winograd F(4x4, 3x3) (`use_winograd`), with
    `residuals` (default) the ResNet blocks' last convolution accumulated into the residual (`fuse_residuals`).
    Eval-only. Measured on the Intel Xeon (AVX-512) here (results/inference_bench.csv, torch_fused vs
    torch_folded, R-50-D8 / R-101-D8 at 512x1024): channels_last is slower at one thread and at two (the Winograd
    tile gather reads across the interleaved channels, the residual accumulation needs NCHW), so the command
    lines leave it off."""
    folded = fold_batchnorm(model, example)
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
        if hasattr(folded, "channels_last"):
            folded.channels_last = True
    if winograd:
        use_winograd(folded)
    if residuals:
        fuse_residuals(folded)
    return folded
