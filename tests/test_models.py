"""Models: weight-decay groups, BlurPool, build_model (torchvision and timm), compile_model,
state-dict helpers."""
import copy
import sys
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn

from imagenet_ffcv import models, weights
from imagenet_ffcv.models import BlurPoolConv2d


NO_TIMM = ('timm is optional (requirements-extras.txt): .venv/bin/pip install -r '
           'requirements-extras.txt runs this test')

@pytest.fixture(scope='module')
def rn50_blur():
    """The resnet50 of the rn50 recipes: blurpool, channels_last, 10 classes."""
    torch.manual_seed(0)
    return models.build_model(arch='resnet50', num_classes=10, use_blurpool=True, channels_last=True)


@pytest.fixture(scope='module')
def rn18_blur():
    """A resnet18 with blurpool (NCHW), 10 classes."""
    torch.manual_seed(1)
    return models.build_model(arch='resnet18', num_classes=10, use_blurpool=True, channels_last=False)


def _strided_convs(model):
    """Number of plain Conv2d with stride > 1 and at least 16 input channels."""
    return sum(1 for m in model.modules()
               if type(m) is nn.Conv2d and max(m.stride) > 1 and m.in_channels >= 16)


# ----------------------------------------------------------------------------- param_groups
def test_param_groups_bn_and_biases_not_decayed(rn50_blur):
    """bn_wd=False: downsample BatchNorm (layer1.0.downsample[1]) and fc.bias in the wd=0 group."""
    decayed, not_decayed = models.param_groups(rn50_blur, weight_decay=1e-4, bn_wd=False)
    assert decayed['weight_decay'] == 1e-4
    assert not_decayed['weight_decay'] == 0.0
    dec = {id(p) for p in decayed['params']}
    nodec = {id(p) for p in not_decayed['params']}
    ds_bn = rn50_blur.layer1[0].downsample[1]
    assert isinstance(ds_bn, nn.BatchNorm2d)
    for p in (ds_bn.weight, ds_bn.bias, rn50_blur.fc.bias, rn50_blur.bn1.weight,
              rn50_blur.layer4[2].bn3.bias):
        assert id(p) in nodec and id(p) not in dec
    for p in (rn50_blur.conv1.weight, rn50_blur.layer1[0].downsample[0].weight,
              rn50_blur.layer2[0].conv2.weight, rn50_blur.fc.weight):
        assert id(p) in dec and id(p) not in nodec


def test_param_groups_resnet50_counts(rn50_blur):
    """ResNet-50 has 53 convs + fc.weight = 54 decayed; 53 BNs x 2 + fc.bias = 107 not decayed."""
    decayed, not_decayed = models.param_groups(rn50_blur, weight_decay=1e-4, bn_wd=False)
    assert len(decayed['params']) == 54
    assert len(not_decayed['params']) == 107


def test_param_groups_every_parameter_exactly_once(rn50_blur):
    """The groups partition model.parameters(): no parameter missing nor repeated."""
    for bn_wd in (False, True):
        groups = models.param_groups(rn50_blur, weight_decay=1e-4, bn_wd=bn_wd)
        counts = Counter(id(p) for g in groups for p in g['params'])
        assert set(counts) == {id(p) for p in rn50_blur.parameters()}
        assert set(counts.values()) == {1}
        assert sum(counts.values()) == len(list(rn50_blur.parameters()))


def test_param_groups_bn_wd_decays_everything(rn50_blur):
    """bn_wd=True: every parameter in the decayed group, the wd=0 group is empty."""
    decayed, not_decayed = models.param_groups(rn50_blur, weight_decay=5e-5, bn_wd=True)
    assert decayed['weight_decay'] == 5e-5
    assert len(decayed['params']) == len(list(rn50_blur.parameters())) == 161
    assert not_decayed['params'] == []


def test_param_groups_skip_frozen_parameters():
    """Parameters with requires_grad=False are left out of both groups."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model[0].weight.requires_grad_(False)
    decayed, not_decayed = models.param_groups(model, weight_decay=0.1, bn_wd=False)
    assert decayed['params'] == []
    assert {id(p) for p in not_decayed['params']} == {id(model[0].bias), id(model[1].weight),
                                                     id(model[1].bias)}


# ----------------------------------------------------------------------------- BlurPool
def test_blurpool_count_resnet50(rn50_blur):
    """One BlurPoolConv2d per strided conv with >= 16 input channels of the plain resnet50."""
    expected = _strided_convs(torchvision.models.resnet50(num_classes=10))
    assert expected > 0
    assert sum(isinstance(m, BlurPoolConv2d) for m in rn50_blur.modules()) == expected
    assert _strided_convs(rn50_blur) == 0  # none left unwrapped


def test_blurpool_count_resnet18(rn18_blur):
    """One BlurPoolConv2d per strided conv with >= 16 input channels of the plain resnet18."""
    expected = _strided_convs(torchvision.models.resnet18(num_classes=10))
    assert expected > 0
    assert sum(isinstance(m, BlurPoolConv2d) for m in rn18_blur.modules()) == expected
    assert _strided_convs(rn18_blur) == 0


def test_blurpool_leaves_stem_conv_alone(rn18_blur):
    """conv1 (stride 2 but 3 input channels) stays a plain Conv2d."""
    assert type(rn18_blur.conv1) is nn.Conv2d
    assert isinstance(rn18_blur.layer2[0].conv1, BlurPoolConv2d)


def test_blurpool_state_dict_loads_into_plain_torchvision_and_matches(rn18_blur):
    """strict load into torchvision resnet18; after apply_blurpool both give identical outputs."""
    plain = torchvision.models.resnet18(num_classes=10)
    sd = rn18_blur.state_dict()
    assert not any('blur_filter' in k for k in sd)
    plain.load_state_dict(sd, strict=True)
    models.apply_blurpool(plain)
    rn18_blur.eval()
    plain.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = rn18_blur(x), plain(x)
    assert a.shape == (2, 10)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_blurpool_conv_output_differs_from_plain_conv():
    """The wrapped conv shares its parameters, yet blurs first: outputs differ on a random input."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    blur = BlurPoolConv2d(conv)
    assert blur.weight is conv.weight and blur.bias is conv.bias
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        y_plain, y_blur = conv(x), blur(x)
    assert y_plain.shape == y_blur.shape == (1, 8, 4, 4)
    assert (y_plain - y_blur).abs().max() > 1e-3


def test_blurpool_kernel_is_binomial_3x3():
    """With an identity 1x1 conv, a unit impulse comes out as [[1,2,1],[2,4,2],[1,2,1]] / 16."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    blur = BlurPoolConv2d(conv)
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    with torch.no_grad():
        y = blur(x)[0, 0]
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16
    torch.testing.assert_close(y, expected)


def test_blurpool_conv_strided_values_on_constant_interior():
    """A constant image stays constant under the blur away from the zero-padded border."""
    conv = nn.Conv2d(1, 1, 1, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(2.0)
    blur = BlurPoolConv2d(conv)
    with torch.no_grad():
        y = blur(torch.full((1, 1, 7, 7), 3.0))[0, 0]
    assert y.shape == (4, 4)
    # interior sampled pixels (2,2), (2,4), (4,2), (4,4) of the input: 3 * 2 = 6
    torch.testing.assert_close(y[1:3, 1:3], torch.full((2, 2), 6.0))
    # corner (0,0): 4 of the 16 kernel weights fall inside -> 3 * 9/16 * 2
    assert y[0, 0].item() == pytest.approx(3 * 9 / 16 * 2)


# ----------------------------------------------------------------------------- build_model
def test_build_model_unknown_arch_lists_valid_names():
    """An unknown arch is an UnknownArchError (which the command prints as one line, not a
    traceback) naming it and listing valid names (e.g. resnet50)."""
    with pytest.raises(models.UnknownArchError) as info:
        models.build_model(arch='no_such_net', num_classes=10, use_blurpool=False,
                           channels_last=False)
    msg = str(info.value)
    assert 'no_such_net' in msg
    assert 'resnet50' in msg and 'resnet18' in msg
    assert 'timm:<name>' in msg


def test_build_model_channels_last_and_classes(rn50_blur):
    """channels_last=True puts conv weights in NHWC; the head has num_classes outputs."""
    assert rn50_blur.fc.out_features == 10
    w = rn50_blur.conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert not w.is_contiguous()


# ----------------------------------------------------------------------------- timm models
def test_timm_model_builds_and_its_state_dict_loads_into_timm():
    """timm:resnet10t with BlurPool and channels_last: (N, 7) logits at 64 px; its state dict
    loads strictly into timm.create_model('resnet10t'), which after apply_blurpool gives the same
    logits."""
    timm = pytest.importorskip('timm', reason=NO_TIMM)
    torch.manual_seed(0)
    model = models.build_model(arch='timm:resnet10t', num_classes=7, use_blurpool=True,
                               channels_last=True)
    assert sum(isinstance(m, BlurPoolConv2d) for m in model.modules()) > 0
    assert _strided_convs(model) == 0
    assert model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = timm.create_model('resnet10t', pretrained=False, num_classes=7)
    plain.load_state_dict(model.state_dict(), strict=True)
    models.apply_blurpool(plain)
    model.eval()
    plain.eval()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 7) and out.dtype == torch.float32
        torch.testing.assert_close(out, plain(x))


def test_timm_model_rebuilt_by_checkpoint_load_model(tmp_path):
    """Final weights of a timm:resnet10t run come back through weights.load_model (which calls
    build_model): from the .safetensors with its config, and from the .pt with keyword values."""
    pytest.importorskip('timm', reason=NO_TIMM)
    torch.manual_seed(0)
    model = models.build_model(arch='timm:resnet10t', num_classes=3, use_blurpool=True,
                               channels_last=True).eval()
    config = {'model': {'arch': 'timm:resnet10t'},
              'training': {'use_blurpool': 1, 'channels_last': 1},
              'validation': {'resolution': 64, 'lr_tta': 1}}
    classes = [(f'n{i:08d}', f'class {i}') for i in range(3)]
    safe = weights.save_final_weights(models.unwrapped_state_dict(model),
                                         tmp_path / 'final_weights.pt', config=config,
                                         classes=classes)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    for saved in (weights.load_model(safe),
                  weights.load_model(tmp_path / 'final_weights.pt', num_classes=3,
                                        arch='timm:resnet10t', use_blurpool=True,
                                        channels_last=True)):
        assert saved.arch == 'timm:resnet10t'
        with torch.no_grad():
            torch.testing.assert_close(saved.model.eval()(x), expected, rtol=0, atol=0)


def test_timm_missing_names_the_package_and_the_extras(monkeypatch):
    """Without timm (a None entry in sys.modules makes its import fail) a timm: arch is an
    ImportError naming timm, its pin and the checkout's extra; torchvision archs still build."""
    monkeypatch.setitem(sys.modules, 'timm', None)
    with pytest.raises(ImportError) as info:
        models.build_model(arch='timm:resnet10t', num_classes=10, use_blurpool=False,
                           channels_last=False)
    msg = str(info.value)
    assert 'pip install timm==1.0.31' in msg and "pip install -e '.[timm]'" in msg
    models.build_model(arch='resnet18', num_classes=10, use_blurpool=False, channels_last=False)


@pytest.mark.parametrize('arch', ['timm:no_such_net', 'timm:', 'timm:hf-hub:someone/some_net'])
def test_timm_unknown_name_is_a_value_error(arch):
    """An unknown timm name (or another source, which would download) is a ValueError naming the
    arch and pointing at timm.list_models()."""
    pytest.importorskip('timm', reason=NO_TIMM)
    with pytest.raises(ValueError) as info:
        models.build_model(arch=arch, num_classes=10, use_blurpool=False, channels_last=False)
    assert repr(arch) in str(info.value) and 'timm.list_models()' in str(info.value)


# ----------------------------------------------------------------------------- compile_model
def _loss_and_grads(model, x, y):
    """Cross-entropy of one forward pass and the gradients of its backward: (loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    named = getattr(model, '_orig_mod', model).named_parameters()
    return loss.detach(), {name: p.grad.clone() for name, p in named}


def test_compile_model_matches_eager_at_two_resolutions():
    """A small ResNet-like net (conv, BatchNorm, a strided conv under BlurPool, channels_last,
    10 classes; ResNet-18 itself takes ~80 s to compile on 2 cores), batch 4: the compiled model's
    loss and gradients equal eager's from the same weights at 32 px, then again at 48 px (a
    recompile); the recompile limit is raised; the unwrapped state dict has the eager keys."""
    torch.manual_seed(0)
    eager = models.apply_blurpool(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)))
    assert isinstance(eager[3], models.BlurPoolConv2d)
    eager = eager.to(memory_format=torch.channels_last)
    compiled = models.compile_model(copy.deepcopy(eager))
    assert torch._dynamo.config.recompile_limit >= models.RECOMPILE_LIMIT
    g = torch.Generator().manual_seed(0)
    for res in (32, 48):
        x = torch.randn(4, 3, res, res, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (4,), generator=g)
        loss, grads = _loss_and_grads(eager, x, y)
        loss_c, grads_c = _loss_and_grads(compiled, x, y)
        assert loss_c.item() == pytest.approx(loss.item(), rel=1e-4)
        assert grads_c.keys() == grads.keys()
        for name, grad in grads.items():
            scale = max(1.0, grad.abs().max().item())  # inductor reorders float sums
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-3, atol=1e-4 * scale,
                                       msg=name)
    assert all(k.startswith('_orig_mod.') for k in compiled.state_dict())
    assert list(models.unwrapped_state_dict(compiled)) == list(eager.state_dict())


# ----------------------------------------------------------------------------- state-dict helpers
class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real model under ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class Compiled(nn.Module):
    """Stands in for torch.compile's OptimizedModule: the real model under ``._orig_mod``."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_unwrapped_state_dict_strips_module_prefix():
    """A wrapper's 'module.' prefix is removed: keys and values equal the inner model's."""
    inner = _small()
    wrapped = Wrapper(inner)
    assert all(k.startswith('module.') for k in wrapped.state_dict())
    sd = models.unwrapped_state_dict(wrapped)
    assert list(sd) == list(inner.state_dict())
    assert '0.weight' in sd and '1.running_mean' in sd
    for k, v in inner.state_dict().items():
        assert torch.equal(sd[k], v)
    fresh = _small()
    fresh.load_state_dict(sd, strict=True)


def test_unwrapped_state_dict_strips_nested_wrappers():
    """DDP around torch.compile ('module._orig_mod.') is unwrapped down to the plain keys."""
    inner = _small()
    sd = models.unwrapped_state_dict(Wrapper(Compiled(inner)))
    assert list(sd) == list(inner.state_dict())


def test_unwrapped_state_dict_is_detached_cpu_copy_keys():
    """Values are detached (no grad) CPU tensors."""
    sd = models.unwrapped_state_dict(_small())
    assert all(v.device.type == 'cpu' and not v.requires_grad for v in sd.values())


def test_state_sha256_equal_for_identical_weights():
    """A deepcopy hashes the same (and a wrapped model hashes as its inner model)."""
    a = _small()
    b = copy.deepcopy(a)
    h = models.state_sha256(a)
    assert len(h) == 64 and int(h, 16) >= 0
    assert models.state_sha256(b) == h
    assert models.state_sha256(Wrapper(b)) == h


def test_state_sha256_changes_with_one_element():
    """Changing a single weight element changes the hash; changing it back restores it."""
    a = _small()
    b = copy.deepcopy(a)
    h = models.state_sha256(a)
    with torch.no_grad():
        b[3].weight[1, 2] += 1e-3
    assert models.state_sha256(b) != h
    with torch.no_grad():
        b[3].weight[1, 2] = a[3].weight[1, 2]
    assert models.state_sha256(b) == h


def test_state_sha256_changes_with_buffer():
    """BatchNorm running statistics (buffers) are part of the hash."""
    a = _small()
    b = copy.deepcopy(a)
    b[1].running_mean[0] = 0.5
    assert models.state_sha256(a) != models.state_sha256(b)


def test_state_sha256_independent_of_memory_format():
    """Same values in NHWC memory format hash the same (bytes are taken in logical order)."""
    a = _small()
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    assert b[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert models.state_sha256(a) == models.state_sha256(b)


def test_unwrapped_keeps_keys_that_only_look_wrapped_or_blurred():
    """A prefix is removed only when every key has it (a model with a submodule named 'module'
    keeps its keys), and only ffcv-imagenet's BlurPool convs lose their '.conv' (DenseNet's
    transition and GoogLeNet's BasicConv2d keep theirs: their weights would not load)."""
    import torchvision
    from imagenet_ffcv.state_dicts import unwrapped
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    partly = {('module.' + k if k.startswith('fc.') else k): v for k, v in state.items()}
    assert unwrapped(partly).keys() == partly.keys()
    for model in (torchvision.models.densenet121(num_classes=3),
                  torchvision.models.googlenet(num_classes=3, aux_logits=False,
                                               init_weights=False)):
        own = model.state_dict()
        assert any('.conv.' in k for k in own) and list(unwrapped(own)) == list(own)
