"""Tests of models.checkpoints: state dicts built in each released layout (key names and shapes as
mmsegmentation, sssegmentation, the official CCNet repository, torchvision and the ImageNet releases publish
them, written out here independently of the mapping table) must land in every parameter of ours."""

import pytest
import torch
import torch.nn.functional as F

import models
from models.checkpoints import detect_source, export_state_dict, load_checkpoint
from models.resnet import ResNet
from repro.io import save_checkpoint

BLOCKS_R50 = (3, 4, 6, 3)


def _bn(prefix, channels, *, tracked=True):
    spec = {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")}
    if tracked:
        spec[f"{prefix}.num_batches_tracked"] = ()
    return spec


def _conv(prefix, out_channels, in_channels, kernel, *, bias=False):
    spec = {f"{prefix}.weight": (out_channels, in_channels, kernel, kernel)}
    if bias:
        spec[f"{prefix}.bias"] = (out_channels,)
    return spec


def _layers(prefix, in_channels, *, tracked=True):
    """ResNet-50 layer1..layer4 in the common torchvision / mmsegmentation / official naming."""
    spec = {}
    for layer, blocks in enumerate(BLOCKS_R50, start=1):
        planes = 64 * 2 ** (layer - 1)
        for block in range(blocks):
            name = f"{prefix}layer{layer}.{block}"
            spec |= _conv(f"{name}.conv1", planes, in_channels, 1) | _bn(
                f"{name}.bn1", planes, tracked=tracked
            )
            spec |= _conv(f"{name}.conv2", planes, planes, 3) | _bn(f"{name}.bn2", planes, tracked=tracked)
            spec |= _conv(f"{name}.conv3", planes * 4, planes, 1) | _bn(
                f"{name}.bn3", planes * 4, tracked=tracked
            )
            if block == 0:
                spec |= _conv(f"{name}.downsample.0", planes * 4, in_channels, 1)
                spec |= _bn(f"{name}.downsample.1", planes * 4, tracked=tracked)
            in_channels = planes * 4
    return spec


def _v1c_stem(prefix):
    return (
        _conv(f"{prefix}stem.0", 32, 3, 3)
        | _bn(f"{prefix}stem.1", 32)
        | _conv(f"{prefix}stem.3", 32, 32, 3)
        | _bn(f"{prefix}stem.4", 32)
        | _conv(f"{prefix}stem.6", 64, 32, 3)
        | _bn(f"{prefix}stem.7", 64)
    )


def _deep_stem(*, tracked):
    return (
        _conv("conv1", 64, 3, 3)
        | _bn("bn1", 64, tracked=tracked)
        | _conv("conv2", 64, 64, 3)
        | _bn("bn2", 64, tracked=tracked)
        | _conv("conv3", 128, 64, 3)
        | _bn("bn3", 128, tracked=tracked)
    )


def _cca(prefix, *, gamma_shape):
    spec = _conv(f"{prefix}.query_conv", 64, 512, 1, bias=True) | _conv(
        f"{prefix}.key_conv", 64, 512, 1, bias=True
    )
    spec |= _conv(f"{prefix}.value_conv", 512, 512, 1, bias=True)
    spec[f"{prefix}.gamma" + (".scale" if gamma_shape == () else "")] = gamma_shape
    return spec


def mmseg_spec(classes=19):
    """mmsegmentation ccnet_r50-d8: ResNetV1c + CCHead(channels 512) + FCN auxiliary head (256)."""
    spec = _v1c_stem("backbone.") | _layers("backbone.", 64)
    spec |= _conv("decode_head.conv_seg", classes, 512, 1, bias=True)
    spec |= _conv("decode_head.convs.0.conv", 512, 2048, 3) | _bn("decode_head.convs.0.bn", 512)
    spec |= _conv("decode_head.convs.1.conv", 512, 512, 3) | _bn("decode_head.convs.1.bn", 512)
    spec |= _cca("decode_head.cca", gamma_shape=())
    spec |= _conv("decode_head.conv_cat.conv", 512, 2560, 3) | _bn("decode_head.conv_cat.bn", 512)
    spec |= _conv("auxiliary_head.conv_seg", classes, 256, 1, bias=True)
    spec |= _conv("auxiliary_head.convs.0.conv", 256, 1024, 3) | _bn("auxiliary_head.convs.0.bn", 256)
    return spec


def ssseg_spec(classes=19):
    """sssegmentation ccnet_resnet50os8: conv3x3-stem ResNet, conv_before_cca, cca, conv_after_cca,
    decoder, auxiliary_decoder (512)."""
    spec = _v1c_stem("backbone_net.") | _layers("backbone_net.", 64)
    spec |= _conv("conv_before_cca.0", 512, 2048, 3) | _bn("conv_before_cca.1", 512)
    spec |= _cca("cca", gamma_shape=())
    spec |= _conv("conv_after_cca.0", 512, 512, 3) | _bn("conv_after_cca.1", 512)
    spec |= (
        _conv("decoder.0", 512, 2560, 3)
        | _bn("decoder.1", 512)
        | _conv("decoder.4", classes, 512, 1, bias=True)
    )
    spec |= _conv("auxiliary_decoder.0", 512, 1024, 3) | _bn("auxiliary_decoder.1", 512)
    spec |= _conv("auxiliary_decoder.4", classes, 512, 1, bias=True)
    return spec


def official_spec(classes=19):
    """speedinghzl/CCNet networks/ccnet.py (with ResNet-50 blocks): deep stem, RCCAModule, dsn; InPlaceABNSync
    norms carry no num_batches_tracked; the dsn conv has a bias."""
    spec = _deep_stem(tracked=False) | _layers("", 128, tracked=False)
    spec |= _conv("head.conva.0", 512, 2048, 3) | _bn("head.conva.1", 512, tracked=False)
    spec |= _cca("head.cca", gamma_shape=(1,))
    spec |= _conv("head.convb.0", 512, 512, 3) | _bn("head.convb.1", 512, tracked=False)
    spec |= _conv("head.bottleneck.0", 512, 2560, 3) | _bn("head.bottleneck.1", 512, tracked=False)
    spec |= _conv("head.bottleneck.3", classes, 512, 1, bias=True)
    spec |= _conv("dsn.0", 512, 1024, 3, bias=True) | _bn("dsn.1", 512, tracked=False)
    spec |= _conv("dsn.3", classes, 512, 1, bias=True)
    return {"module." + key: shape for key, shape in spec.items()}  # saved from a DataParallel model


def torchvision_spec():
    return (
        _conv("conv1", 64, 3, 7)
        | _bn("bn1", 64)
        | _layers("", 64)
        | {"fc.weight": (1000, 2048), "fc.bias": (1000,)}
    )


def official_imagenet_spec():
    spec = _deep_stem(tracked=False) | _layers("", 128, tracked=False)
    return spec | {"fc.weight": (1000, 2048), "fc.bias": (1000,)}


def mmseg_imagenet_spec():
    return _v1c_stem("") | _layers("", 64) | {"fc.weight": (1000, 2048), "fc.bias": (1000,)}


FULL = {
    "mmseg": (mmseg_spec, dict(stem="v1c")),
    "sssegmentation": (ssseg_spec, dict(stem="v1c", aux_channels=512)),
    "official": (
        official_spec,
        dict(
            stem="deep", aux_channels=512, head_act="leaky_relu", contract_dilation=False, pool_ceil_mode=True
        ),
    ),
}
BACKBONE = {
    "torchvision": (torchvision_spec, "v1"),
    "official_imagenet": (official_imagenet_spec, "deep"),
    "mmseg_imagenet": (mmseg_imagenet_spec, "v1c"),
}


def random_state(spec, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in spec.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


def _build(**kwargs):
    return models.build(**{"depth": 50, "num_classes": 19, "backend": "naive", **kwargs})


def _strip(key):
    return key.removeprefix("module.")


@pytest.mark.parametrize("source", list(FULL))
def test_released_layout_fills_every_weight(source):
    spec_fn, kwargs = FULL[source]
    state = random_state(spec_fn())
    model = _build(**kwargs)
    report = load_checkpoint(model, state)
    assert report.source == source
    assert report.missing == () and report.unexpected == () and report.ignored == ()
    ours = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert ours <= set(report.loaded)
    # Every foreign tensor is where the export puts it back: the mapping is one to one and shape-preserving.
    exported = export_state_dict(model, source=source)
    foreign = {_strip(k): v for k, v in state.items()}
    assert set(exported) == set(foreign)
    folded = {"dsn.0.bias", "dsn.1.running_mean"} if source == "official" else set()
    for key, value in foreign.items():
        assert exported[key].shape == value.shape, key
        if key not in folded:
            assert torch.equal(exported[key].to(value.dtype), value), key
    if source == "official":
        assert torch.equal(exported["dsn.0.bias"], torch.zeros(512))
        torch.testing.assert_close(
            exported["dsn.1.running_mean"], foreign["dsn.1.running_mean"] - foreign["dsn.0.bias"]
        )


@pytest.mark.parametrize(
    "source, foreign_key, attribute",
    [
        ("mmseg", "decode_head.cca.query_conv.weight", "decode_head.attention.query_conv.weight"),
        ("mmseg", "decode_head.cca.key_conv.weight", "decode_head.attention.key_conv.weight"),
        ("mmseg", "decode_head.convs.1.conv.weight", "decode_head.conv_out.0.weight"),
        ("mmseg", "decode_head.convs.0.bn.running_var", "decode_head.conv_in.1.running_var"),
        ("mmseg", "backbone.stem.4.weight", "backbone.stem.4.weight"),
        ("sssegmentation", "cca.key_conv.bias", "decode_head.attention.key_conv.bias"),
        ("sssegmentation", "conv_after_cca.1.bias", "decode_head.conv_out.1.bias"),
        ("sssegmentation", "backbone_net.layer3.2.bn2.weight", "backbone.layer3.2.bn2.weight"),
        ("official", "module.bn2.weight", "backbone.stem.4.weight"),
        ("official", "module.head.cca.query_conv.bias", "decode_head.attention.query_conv.bias"),
        ("official", "module.head.convb.1.weight", "decode_head.conv_out.1.weight"),
        (
            "official",
            "module.layer2.0.downsample.1.running_mean",
            "backbone.layer2.0.downsample.1.running_mean",
        ),
    ],
)
def test_same_shaped_weights_are_not_swapped(source, foreign_key, attribute):
    spec_fn, kwargs = FULL[source]
    state = random_state(spec_fn())
    model = _build(**kwargs)
    load_checkpoint(model, state)
    assert torch.equal(model.state_dict()[attribute], state[foreign_key])


@pytest.mark.parametrize("source", list(FULL) + ["ccrepro"])
def test_outputs_equal_after_round_trip(source):
    kwargs = FULL[source][1] if source in FULL else dict(stem="deep", head_channels=32)
    torch.manual_seed(1)
    original = _build(**kwargs)
    original.decode_head.set_gamma(0.8)
    # Non-trivial norm statistics, so that every buffer matters in eval mode.
    for name, buffer in original.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
    torch.manual_seed(2)
    restored = _build(**kwargs)
    load_checkpoint(restored, export_state_dict(original, source=source), source=source)
    images = torch.randn(2, 3, 33, 33)
    original.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(images), original(images), rtol=0, atol=0)
    original.train()
    restored.train()
    torch.manual_seed(3)
    out_a = original(images)
    torch.manual_seed(3)
    out_b = restored(images)
    torch.testing.assert_close(out_b[1], out_a[1], rtol=0, atol=0)


def test_official_dsn_bias_folding_is_exact():
    state = random_state(official_spec())
    model = _build(**FULL["official"][1]).eval()
    load_checkpoint(model, state)
    # float64 forward (outputs are in the thousands with random weights); the folded mean itself was
    # computed in float32 when loading, hence the 1e-5 tolerance. Without the fold it is ~56.
    model.double()
    s = {_strip(k): v.double() for k, v in state.items()}
    x = torch.randn(1, 1024, 7, 9, dtype=torch.float64)
    reference = F.conv2d(x, s["dsn.0.weight"], s["dsn.0.bias"], padding=1)
    reference = F.batch_norm(
        reference, s["dsn.1.running_mean"], s["dsn.1.running_var"], s["dsn.1.weight"], s["dsn.1.bias"]
    )
    reference = F.conv2d(F.leaky_relu(reference, 0.01), s["dsn.3.weight"], s["dsn.3.bias"])
    with torch.no_grad():
        torch.testing.assert_close(model.auxiliary_head(x), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", list(BACKBONE))
def test_imagenet_backbones(source, tmp_path):
    spec_fn, stem = BACKBONE[source]
    state = random_state(spec_fn())
    assert detect_source(state) == source
    model = _build(stem=stem, head_channels=32)
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    report = load_checkpoint(model, state)
    assert report.missing == () and report.unexpected == ()
    assert set(report.ignored) == {"fc.weight", "fc.bias"}
    assert all(key.startswith("backbone.") for key in report.loaded)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in heads_before.items())
    assert torch.equal(model.backbone.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    # Into a bare backbone, from a file, and through build(pretrained_backbone=...).
    backbone = ResNet(depth=50, stem=stem)
    load_checkpoint(backbone, state, source=source)
    torch.testing.assert_close(
        backbone.state_dict()["stem.1.running_var"], model.state_dict()["backbone.stem.1.running_var"]
    )
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    built = _build(stem=stem, head_channels=32, pretrained_backbone=path)
    assert torch.equal(built.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    exported = export_state_dict(model, source=source)
    # The export is the ImageNet file without its classifier (which the segmentor has no use for), key for key
    # and value for value.
    assert set(exported) == set(state) - {"fc.weight", "fc.bias"}
    for key, value in exported.items():
        assert torch.equal(value, state[key]), key


def test_full_checkpoint_into_bare_backbone_ignores_heads():
    state = random_state(mmseg_spec())
    backbone = ResNet(depth=50, stem="v1c")
    report = load_checkpoint(backbone, state, source="mmseg")
    assert report.missing == () and report.unexpected == ()
    assert all(key.startswith(("decode_head.", "auxiliary_head.")) for key in report.ignored)
    assert torch.equal(backbone.stem[0].weight, state["backbone.stem.0.weight"])


def test_shape_mismatch_names_key_and_both_shapes():
    state = random_state(mmseg_spec(classes=19))
    model = _build(stem="v1c", num_classes=5)
    with pytest.raises(
        ValueError, match=r"decode_head\.conv_seg\.weight.*\(19, 512, 1, 1\).*\(5, 512, 1, 1\)"
    ):
        load_checkpoint(model, state)
    with pytest.raises(ValueError, match=r"backbone\.stem\.0\.weight.*\(32, 3, 3, 3\).*\(64, 3, 3, 3\)"):
        load_checkpoint(_build(stem="deep"), state, source="mmseg")


def test_strict_reports_missing_and_unexpected():
    state = random_state(mmseg_spec())
    del state["decode_head.cca.value_conv.bias"]
    state["decode_head.extra.weight"] = torch.zeros(3)
    model = _build(stem="v1c")
    with pytest.raises(ValueError, match=r"decode_head\.attention\.value_conv\.bias"):
        load_checkpoint(model, state)
    report = load_checkpoint(model, state, strict=False)
    assert report.missing == ("decode_head.attention.value_conv.bias",)
    assert report.unexpected == ("decode_head.extra.weight",)
    assert "1 missing" in str(report)
    # The R=0 baseline has no place for attention weights.
    with pytest.raises(ValueError, match="unexpected"):
        load_checkpoint(_build(stem="v1c", recurrence=0), random_state(mmseg_spec()))


def test_old_mmcv_gamma_and_conflicts():
    state = random_state(mmseg_spec())
    state["decode_head.cca.gamma"] = state.pop("decode_head.cca.gamma.scale").reshape(1)
    model = _build(stem="v1c")
    load_checkpoint(model, state)
    assert model.decode_head.attention.gamma.item() == state["decode_head.cca.gamma"].item()
    state["decode_head.cca.gamma.scale"] = torch.tensor(0.5)
    with pytest.raises(ValueError, match="both map"):
        load_checkpoint(model, state)


def test_mmseg_fcn_decode_head_maps_onto_fcn_head():
    model = _build(stem="v1c", head="fcn")
    spec = {k: v for k, v in mmseg_spec().items() if not k.startswith("decode_head.cca.")}
    state = random_state(spec)
    report = load_checkpoint(model, state, source="mmseg")
    assert report.missing == () and report.unexpected == ()
    assert torch.equal(model.decode_head.convs[1][0].weight, state["decode_head.convs.1.conv.weight"])
    assert torch.equal(model.decode_head.conv_cat[1].bias, state["decode_head.conv_cat.bn.bias"])


def test_files_wrappers_and_bad_inputs(tmp_path):
    model = _build(stem="v1c", head_channels=32)
    path = save_checkpoint(model, tmp_path / "sub" / "model.pth", extra={"step": 3})
    assert path.is_file() and list(path.parent.iterdir()) == [path]
    fresh = _build(stem="v1c", head_channels=32)
    assert load_checkpoint(fresh, path).source == "ccrepro"
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )
    wrapped = {"state_dict": {"module." + k: v for k, v in export_state_dict(model, source="mmseg").items()}}
    assert load_checkpoint(fresh, wrapped).source == "mmseg"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(fresh, tmp_path / "missing.pth")
    with pytest.raises(TypeError, match="state dict"):
        load_checkpoint(fresh, 42)
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        load_checkpoint(fresh, path, source="timm")
    with pytest.raises(ValueError, match="cannot detect"):
        detect_source({"encoder.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no place"):
        export_state_dict(_build(stem="v1c", head="fcn", head_channels=32), source="sssegmentation")


def test_detect_source_of_each_layout():
    assert detect_source(mmseg_spec()) == "mmseg"
    assert detect_source(ssseg_spec()) == "sssegmentation"
    assert detect_source({_strip(k): v for k, v in official_spec().items()}) == "official"
    assert detect_source(_build(stem="v1c", head_channels=32).state_dict()) == "ccrepro"


@pytest.mark.parametrize(
    "name",
    [f"ssseg_{dataset}_r50_{os}" for dataset in ("ade20k", "cityscapes", "voc") for os in ("d8", "d16")],
)
def test_ssseg_rows_accept_an_ssseg_checkpoint(name):
    """Every sssegmentation row builds sssegmentation's network (the v1c stem 3->32->32->64 of its
    `resnet50conv3x3stem`) so that a checkpoint in its layout places every tensor (R-101 rows differ only in
    layer3's block count)."""
    from pathlib import Path

    from repro.engine.config import load_config, model_kwargs

    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / f"{name}.yaml")
    kwargs = dict(model_kwargs(cfg), pretrained_backbone=None, backend="naive")
    model = models.build(**kwargs)
    assert tuple(model.backbone.stem[0].weight.shape) == (32, 3, 3, 3)
    state = random_state(ssseg_spec(classes=cfg.model.num_classes))
    report = load_checkpoint(model, state, source="sssegmentation")
    assert not report.missing and not report.unexpected
    ours = model.state_dict()
    loaded = {key for key in ours if not key.endswith("num_batches_tracked")}
    assert set(report.loaded) >= loaded
    assert torch.equal(ours["backbone.stem.6.weight"], state["backbone_net.stem.6.weight"])
    assert torch.equal(ours["decode_head.classifier.weight"], state["decoder.4.weight"])
