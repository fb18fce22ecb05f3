"""Fine-tuning: training that starts from a weights file (model.weights), the classifier new when
the class count differs or model.reset_head asks (imagenet_ffcv/weights.py: init_from)."""
import pytest
import torch

from conftest import small_config
from imagenet_ffcv import distributed, train, weights
from imagenet_ffcv.checkpoint import CheckpointError
from imagenet_ffcv.config import ConfigError
from imagenet_ffcv.models import BlurPoolConv2d, build_model


def resnet18(num_classes, seed, **kwargs):
    torch.manual_seed(seed)
    return build_model(arch='resnet18', num_classes=num_classes, use_blurpool=False,
                       channels_last=False, **kwargs)


def assert_loaded(model, source, *, head_from_file: bool, fresh_head=None):
    """Every weight of ``model`` is the file's (``source``'s), the classifier the file's or
    ``fresh_head`` (None: not compared)."""
    got, expected = model.state_dict(), source.state_dict()
    for key in got:
        if key.startswith('fc.'):
            continue
        assert torch.equal(got[key], expected[key]), key
    if head_from_file:
        assert torch.equal(got['fc.weight'], expected['fc.weight'])
    elif fresh_head is not None:
        assert torch.equal(got['fc.weight'], fresh_head)


def test_a_torchvision_state_dict_of_another_class_count_loads_all_but_the_classifier(tmp_path):
    source = resnet18(10, seed=0)
    torch.save(source.state_dict(), tmp_path / 'resnet18.pt')  # torchvision's plain format
    model = build_model(arch='resnet18', num_classes=5, use_blurpool=True, channels_last=True)
    fresh = model.fc.weight.detach().clone()
    message = weights.init_from(model, tmp_path / 'resnet18.pt', reset_head=False)
    assert 'classifier fc.bias, fc.weight newly initialised (the class count differs)' in message
    assert_loaded(model, source, head_from_file=False, fresh_head=fresh)


def test_our_safetensors_with_the_same_class_count_loads_the_classifier_unless_reset(tmp_path):
    source = resnet18(10, seed=0)
    weights.save_final_weights(source.state_dict(), tmp_path / 'final_weights.pt')
    kept = resnet18(10, seed=1)
    message = weights.init_from(kept, tmp_path / 'final_weights.safetensors', reset_head=False)
    assert 'newly initialised' not in message
    assert_loaded(kept, source, head_from_file=True)
    reset = resnet18(10, seed=1)
    fresh = reset.fc.weight.detach().clone()
    assert 'newly initialised (as asked)' in weights.init_from(
        reset, tmp_path / 'final_weights.pt', reset_head=True)
    assert_loaded(reset, source, head_from_file=False, fresh_head=fresh)


def test_weights_of_another_architecture_are_refused_naming_the_file(tmp_path):
    torch.manual_seed(0)
    other = build_model(arch='resnet34', num_classes=10, use_blurpool=False, channels_last=False)
    torch.save(other.state_dict(), tmp_path / 'resnet34.pt')
    with pytest.raises(CheckpointError, match=r'resnet34.pt: the weights do not fit this model'):
        weights.init_from(resnet18(10, seed=0), tmp_path / 'resnet34.pt', reset_head=False)


@pytest.mark.parametrize('prefix', ['module.', '_orig_mod.', 'module._orig_mod.'])
def test_ddp_or_compiled_state_dicts_load_for_eval_predict_and_finetuning(tmp_path, prefix):
    """Keys saved from a DDP (``module.``) or compiled (``_orig_mod.``) model, as ffcv-imagenet's
    final weights, load into load_model's and init_from's plain model."""
    source = resnet18(10, seed=0)
    path = tmp_path / 'wrapped.pt'
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
    saved = weights.load_model(path, num_classes=10, arch='resnet18', use_blurpool=False,
                               channels_last=False)
    assert_loaded(saved.model, source, head_from_file=True)
    model = resnet18(10, seed=1)
    message = weights.init_from(model, path, reset_head=False)
    assert f'({len(source.state_dict())} tensors)' in message
    assert_loaded(model, source, head_from_file=True)


def test_ffcv_imagenets_blurpool_weights_load_for_eval_predict_and_finetuning(tmp_path):
    """ffcv-imagenet's BlurPool runs save each strided conv as ``<conv>.conv.weight`` beside a
    ``<conv>.blur_filter`` buffer, under DDP's ``module.``: they load into our BlurPool model
    (torchvision's keys) with every weight in place."""
    torch.manual_seed(0)
    source = build_model(arch='resnet18', num_classes=10, use_blurpool=True, channels_last=False)
    blurred = [name for name, m in source.named_modules() if isinstance(m, BlurPoolConv2d)]
    assert blurred  # layer2.0.conv2, layer2.0.downsample.0, ...
    state = {}
    for key, value in source.state_dict().items():
        module, _, name = key.rpartition('.')
        state['module.' + (f'{module}.conv.{name}' if module in blurred else key)] = value
    filters = dict(source.named_buffers())
    for module in blurred:
        state[f'module.{module}.blur_filter'] = filters[f'{module}.blur_filter']
    path = tmp_path / 'final_weights.pt'  # no params.json: the model is given
    torch.save(state, path)
    saved = weights.load_model(path, num_classes=10, arch='resnet18', use_blurpool=True,
                               channels_last=False)
    assert_loaded(saved.model, source, head_from_file=True)
    model = build_model(arch='resnet18', num_classes=10, use_blurpool=True, channels_last=False)
    weights.init_from(model, path, reset_head=False)
    assert_loaded(model, source, head_from_file=True)


def test_weights_that_do_not_fit_for_eval_are_refused_naming_the_keys(tmp_path):
    """load_model's error lists the missing, unexpected and wrongly shaped keys, as init_from's."""
    torch.manual_seed(0)
    other = build_model(arch='resnet34', num_classes=7, use_blurpool=False, channels_last=False)
    state = other.state_dict()
    del state['layer1.0.bn1.running_mean']
    torch.save(state, tmp_path / 'resnet34.pt')
    with pytest.raises(CheckpointError) as info:
        weights.load_model(tmp_path / 'resnet34.pt', num_classes=10, arch='resnet18',
                           use_blurpool=False)
    assert str(info.value).startswith(
        f"{tmp_path / 'resnet34.pt'}: the weights do not fit resnet18 with 10 classes: missing "
        "['layer1.0.bn1.running_mean'], unexpected ['layer1.2.bn1.bias', ")
    assert "other shapes ['fc.bias', 'fc.weight']" in str(info.value)


def test_training_starts_from_model_weights(sample_betons, tmp_path):
    """The run's model (10 classes of the sample) starts from a 7-class ResNet-18's weights."""
    source = resnet18(7, seed=3)
    torch.save(source.state_dict(), tmp_path / 'start.pt')
    run = train.build(small_config(sample_betons, tmp_path, f'--model.weights={tmp_path}/start.pt'),
                      distributed.from_env(), 0.0)
    assert run.model_without_ddp.fc.weight.shape == (10, 512)  # new: the sample has 10 classes
    assert_loaded(run.model_without_ddp, source, head_from_file=False)


def test_reset_head_needs_weights_and_pretrained_is_refused(sample_betons, tmp_path):
    with pytest.raises(ConfigError, match='model.reset_head=1 needs model.weights'):
        small_config(sample_betons, tmp_path, '--model.reset_head=1')
    with pytest.raises(ConfigError, match='never fetched from the network'):
        small_config(sample_betons, tmp_path, '--model.pretrained=1')
