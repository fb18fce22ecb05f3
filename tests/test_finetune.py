"""Fine-tuning: training that starts from a weights file (model.weights), the classifier new when
the class count differs or model.reset_head asks (imagenet_ffcv/finetune.py: init_from)."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import small_config
from imagenet_ffcv import distributed, engine, finetune, train, weights
from imagenet_ffcv.checkpoint import CheckpointError
from imagenet_ffcv.classes import ilsvrc_classes
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
    message = finetune.init_from(model, tmp_path / 'resnet18.pt', reset_head=False)
    assert 'classifier fc.bias, fc.weight newly initialised (the class count differs)' in message
    assert_loaded(model, source, head_from_file=False, fresh_head=fresh)
    # the model has BlurPool, the file does not say how it was trained (torchvision's never had)
    assert message.endswith('to fine-tune such weights as they were trained, set '
                            '--training.use_blurpool=0')
    assert 'note' not in finetune.init_from(resnet18(5, seed=0), tmp_path / 'resnet18.pt',
                                           reset_head=False)  # no BlurPool: nothing to say


def test_our_safetensors_with_the_same_class_count_loads_the_classifier_unless_reset(tmp_path):
    source = resnet18(10, seed=0)
    weights.save_final_weights(source.state_dict(), tmp_path / 'final_weights.pt')
    kept = resnet18(10, seed=1)
    message = finetune.init_from(kept, tmp_path / 'final_weights.safetensors', reset_head=False)
    assert 'newly initialised' not in message
    assert_loaded(kept, source, head_from_file=True)
    reset = resnet18(10, seed=1)
    fresh = reset.fc.weight.detach().clone()
    assert 'newly initialised (as asked)' in finetune.init_from(
        reset, tmp_path / 'final_weights.pt', reset_head=True)
    assert_loaded(reset, source, head_from_file=False, fresh_head=fresh)


def test_weights_of_another_architecture_are_refused_naming_the_file_and_the_arch(tmp_path):
    """Eval-only and predict named the archs the keys fit; fine-tuning did not, nor the key."""
    torch.manual_seed(0)
    other = build_model(arch='resnet34', num_classes=10, use_blurpool=False, channels_last=False)
    torch.save(other.state_dict(), tmp_path / 'resnet34.pt')
    with pytest.raises(CheckpointError, match=r'resnet34.pt: the weights do not fit this model '
                                              r'\(another architecture\? set --model.arch; their '
                                              r'keys fit resnet34\): missing'):
        finetune.init_from(resnet18(10, seed=0), tmp_path / 'resnet34.pt', reset_head=False,
                           arch='resnet18')


def test_a_lightning_checkpoint_loads_and_a_kept_classifier_is_named(tmp_path):
    """A PyTorch Lightning checkpoint (keys 'model.'-prefixed) was refused as another
    architecture; a classifier of the dataset's class count was kept without a word when no
    class list came with the weights (one of another data set's 10 classes, say)."""
    source = resnet18(10, seed=0)
    path = tmp_path / 'epoch=3.ckpt'
    torch.save({'state_dict': {f'model.{k}': v for k, v in source.state_dict().items()},
                'epoch': 3}, path)
    model = resnet18(10, seed=1)
    message = finetune.init_from(model, path, reset_head=False)
    assert_loaded(model, source, head_from_file=True)
    assert message == (f"=> started from {path} (122 tensors); 'model.' removed from the start of "
                       f"every key\nnote: the classifier of {path} is loaded, its outputs taken "
                       f"as the dataset's classes in their order: no class list came with the "
                       f"weights to check them by (--model.reset_head=1 starts it anew)")
    # torchvision's ImageNet weights (1,000 outputs in sorted-wnid order) on ImageNet: nothing to
    # say; on the same 1,000 classes in another order, the note
    torch.save(resnet18(1000, seed=0).state_dict(), tmp_path / 'tv.pth')
    wnids = [wnid for wnid, _ in ilsvrc_classes()]
    for order, noted in ((wnids, False), (wnids[::-1], True)):
        (tmp_path / 'train.classes.tsv').write_text(''.join(f'{i}\t{w}\n'
                                                            for i, w in enumerate(order)))
        message = finetune.init_from(resnet18(1000, seed=1), tmp_path / 'tv.pth', reset_head=False,
                                     class_list=tmp_path / 'train.classes.tsv')
        assert ('note: the classifier of' in message) == noted, message


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
    message = finetune.init_from(model, path, reset_head=False)
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
    assert 'BlurPool' not in finetune.init_from(model, path, reset_head=False)
    assert_loaded(model, source, head_from_file=True)
    # the saved filters say BlurPool was on: eval-only and predict build it so even when told
    # otherwise (evaluated without it, the weights lose accuracy without a word), and
    # fine-tuning a model without it says so
    saved = weights.load_model(path, num_classes=10, arch='resnet18', use_blurpool=False,
                               channels_last=False)
    assert any(isinstance(m, BlurPoolConv2d) for m in saved.model.modules())
    assert 'with BlurPool on, as the BlurPool filters saved in it say (not off as asked)' in \
        saved.assumed
    message = finetune.init_from(resnet18(10, seed=1), path, reset_head=False)
    assert message.endswith('the weights were trained with BlurPool on and this model has it '
                            'off: to fine-tune them as they were trained, set '
                            '--training.use_blurpool=1')
    # in its run folder, beside ffcv-imagenet's params.json (fastargs' flat keys: it was refused
    # as 'not a resolved config of this tool'), the model is built as that run says
    run = tmp_path / 'ffcv_imagenet_run'
    run.mkdir()
    torch.save(state, run / 'final_weights.pt')
    (run / 'params.json').write_text(json.dumps({
        'model.arch': 'resnet18', 'training.use_blurpool': 1, 'validation.resolution': 256,
        'validation.lr_tta': True, 'data.train_dataset': '/data/train_400_0.50_90.ffcv'}))
    saved = weights.load_model(run / 'final_weights.pt', num_classes=10, arch='resnet50',
                               use_blurpool=False)
    assert saved.arch == 'resnet18' and saved.assumed == ''
    assert any(isinstance(m, BlurPoolConv2d) for m in saved.model.modules())
    assert saved.config['validation']['resolution'] == 256
    assert saved.config['data']['decoder'] == 'ffcv'
    assert_loaded(saved.model, source, head_from_file=True)
    # an arch BlurPool changes nothing of (no strided conv of 16 or more input channels), trained
    # and fine-tuned with use_blurpool=1: no note (it said the model had BlurPool off)
    squeeze = build_model(arch='squeezenet1_0', num_classes=10, use_blurpool=True,
                          channels_last=False)
    run_config = {'model': {'arch': 'squeezenet1_0'}, 'training': {'use_blurpool': 1,
                  'channels_last': 0}, 'validation': {'resolution': 224, 'lr_tta': 1}}
    (tmp_path / 'squeeze').mkdir()
    path = weights.save_final_weights(squeeze.state_dict(), tmp_path / 'squeeze' / 'final.pt',
                                      config=run_config)
    assert weights.load_weights(path).blurpool is True
    assert 'note' not in finetune.init_from(squeeze, path, reset_head=False)


@pytest.mark.parametrize('wrapper', ['state_dict', 'model', 'model_state_dict', 'ema'])
def test_other_tools_checkpoints_and_old_state_dicts_load(tmp_path, wrapper):
    """A state dict inside another tool's checkpoint (pytorch/examples' ``{'epoch', 'arch',
    'state_dict' (DDP keys), 'best_acc1', 'optimizer'}``, timm's, ``{'model': ...}``), an EMA's
    (AveragedModel: ``module.`` keys and ``n_averaged``), and a state dict without BatchNorm's
    ``num_batches_tracked`` (PyTorch before 0.4.1, older torchvision files, which
    load_state_dict takes) load for eval, predict and fine-tuning; they were refused. A file
    holding none names what it holds."""
    source = resnet18(10, seed=0)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith('num_batches_tracked')}
    content = {
        'state_dict': {'epoch': 90, 'arch': 'resnet18', 'best_acc1': torch.tensor(69.8),
                       'state_dict': {f'module.{k}': v for k, v in state.items()},
                       'optimizer': {'state': {}, 'param_groups': []}},
        'model': {'model': state, 'epoch': 3},
        'model_state_dict': {'model_state_dict': state, 'optimizer_state_dict': {}},
        'ema': {'n_averaged': torch.tensor(7), **{f'module.{k}': v for k, v in state.items()}},
    }[wrapper]
    torch.save(content, tmp_path / 'other.pth')
    saved = weights.load_model(tmp_path / 'other.pth', num_classes=10, arch='resnet18',
                               use_blurpool=False, channels_last=False)
    assert_loaded(saved.model, source, head_from_file=True)
    model = resnet18(10, seed=1)
    assert f'({len(state)} tensors)' in finetune.init_from(model, tmp_path / 'other.pth',
                                                          reset_head=False)
    assert_loaded(model, source, head_from_file=True)
    torch.save({'epoch': 3, 'weights': [1, 2]}, tmp_path / 'none.pth')
    with pytest.raises(CheckpointError, match=r"none.pth: holds no state dict of tensors \(keys "
                                              r"'epoch', 'weights'\)"):
        weights.load_model(tmp_path / 'none.pth', num_classes=10)


def test_a_backbone_or_weights_of_other_classes_get_a_new_classifier(tmp_path):
    """Fine-tuning from a file without the classifier (a backbone) starts a new one, and so does
    fine-tuning from weights whose saved class list names other wnids than the dataset's, with
    the same count (the old head was kept without a word; a backbone was 'another
    architecture?'). The same classes keep the file's head."""
    source = resnet18(3, seed=0)
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith('fc.')}
    torch.save(backbone, tmp_path / 'backbone.pt')
    model = resnet18(3, seed=1)
    assert 'newly initialised (the file has none)' in finetune.init_from(
        model, tmp_path / 'backbone.pt', reset_head=False)
    assert_loaded(model, source, head_from_file=False)
    run = tmp_path / 'run'
    run.mkdir()
    weights.save_final_weights(source.state_dict(), run / 'final_weights.pt',
                               classes=[('n01', 'a'), ('n02', 'b'), ('n03', 'c')])
    for wnids, kept in ((['n01', 'n02', 'n03'], True), (['n03', 'n02', 'n01'], False)):
        (tmp_path / 'train.classes.tsv').write_text(
            ''.join(f'{i}\t{w}\tname\n' for i, w in enumerate(wnids)))
        model = resnet18(3, seed=1)
        message = finetune.init_from(model, run / 'final_weights.safetensors', reset_head=False,
                                    class_list=tmp_path / 'train.classes.tsv')
        assert ('newly initialised (trained on other classes)' in message) != kept, message
        assert_loaded(model, source, head_from_file=kept)


def test_a_checkpoint_with_parts_missing_or_of_another_format_is_one_error(tmp_path):
    """A checkpoint of another format (a newer version), one without its config, or with its
    classes as bare wnids: CheckpointError naming the file (a KeyError or ValueError traceback,
    or 'neither a checkpoint nor a state dict'); --resume says the same of another format."""
    from imagenet_ffcv import checkpoint
    state = resnet18(10, seed=0).state_dict()
    good = {'format': 1, 'model': state, 'config': None, 'classes': None}
    for name, content, error in (
            ('format2.pt', {**good, 'format': 2}, 'a checkpoint of format 2, written by another '
                                                   'version of this tool; this one reads format 1'),
            ('bare_wnids.pt', {**good, 'classes': ['n01', 'n02']}, 'the saved class list is not'),
            ('no_model.pt', {'format': 1, 'config': None}, 'holds no state dict of tensors')):
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=f'{name}: {error}'):
            weights.load_model(tmp_path / name, num_classes=10, arch='resnet18')
    with pytest.raises(CheckpointError, match='format2.pt: a checkpoint of format 2'):
        checkpoint.load(tmp_path / 'format2.pt')
    torch.save({k: v for k, v in good.items() if k != 'config'}, tmp_path / 'no_config.pt')
    saved = weights.load_model(tmp_path / 'no_config.pt', num_classes=10, arch='resnet18',
                               use_blurpool=False, channels_last=False)
    assert saved.config is None and 'no config saved' in saved.assumed
    with pytest.raises(CheckpointError, match="a folder without a run's weights; give a run "
                                              "folder, its checkpoint.pt or final_weights"):
        weights.load_model(tmp_path, num_classes=10)
    # a run folder: its checkpoint while it trains, its final weights once finished
    (tmp_path / 'run').mkdir()
    torch.save(good, tmp_path / 'run' / 'checkpoint.pt')
    assert checkpoint.weights_in(tmp_path / 'run') == tmp_path / 'run' / 'checkpoint.pt'
    assert weights.load_model(tmp_path / 'run', num_classes=10, arch='resnet18',
                              use_blurpool=False, channels_last=False).config is None
    weights.save_final_weights(state, tmp_path / 'run' / 'final_weights.pt')
    assert checkpoint.weights_in(tmp_path / 'run') == tmp_path / 'run' / 'final_weights.pt'
    (tmp_path / 'run' / 'final_weights.pt').unlink()  # the .safetensors copied alone
    assert checkpoint.weights_in(tmp_path / 'run') == tmp_path / 'run' / 'final_weights.safetensors'
    assert checkpoint.weights_in(tmp_path / 'no_config.pt') == tmp_path / 'no_config.pt'
    # another tool's checkpoint with a 'format' of its own is no checkpoint of this tool
    for fmt in (1, 2, True):
        torch.save({'format': fmt, 'state_dict': state}, tmp_path / 'theirs.pt')
        model = weights.load_model(tmp_path / 'theirs.pt', num_classes=10, arch='resnet18',
                                   use_blurpool=False, channels_last=False).model
        assert torch.equal(model.fc.weight, state['fc.weight'])


def test_weights_whose_own_class_list_and_classifier_differ_are_refused_saying_so(tmp_path):
    """A file saving 5 classes beside a classifier of 10 outputs, read with no class list given:
    the error blamed 'the class list given', which the user had not given."""
    model = build_model(arch='resnet18', num_classes=10, use_blurpool=False, channels_last=False)
    config = {'model': {'arch': 'resnet18'}, 'training': {'use_blurpool': 0, 'channels_last': 0},
              'validation': {'resolution': 32, 'lr_tta': 0}}
    path = weights.save_final_weights(model.state_dict(), tmp_path / 'final_weights.pt',
                                      config=config,
                                      classes=[[f'n0{i}', f'c{i}'] for i in range(5)])
    for file in (path, tmp_path / 'final_weights.pt'):
        with pytest.raises(CheckpointError, match=f'^{file}: its classifier has 10 outputs, but '
                                                  'the class list that comes with it .* names '
                                                  '5: not the classes it was trained on'):
            weights.load_model(file)


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
    # a list cut at 5 says so, and how many there are
    own = build_model(arch='resnet18', num_classes=10, use_blurpool=False,
                      channels_last=False).state_dict()
    unexpected = sorted(state.keys() - own.keys())
    assert len(unexpected) > 5
    assert f"unexpected {unexpected[:5]}"[:-1] + f" ...] ({len(unexpected)} in all), " in str(
        info.value)
    assert str(info.value).endswith('(resnet18 assumed: no config is saved with the weights; name '
                                    'their arch: predict --arch, eval-only --model.arch)')
    # whole, they fit another torchvision arch: named (the user had to guess it from the keys)
    torch.save(other.state_dict(), tmp_path / 'resnet34.pt')
    with pytest.raises(CheckpointError) as info:
        weights.load_model(tmp_path / 'resnet34.pt', num_classes=10, arch='resnet18')
    assert str(info.value).endswith('name their arch: predict --arch, eval-only --model.arch; '
                                    'their keys fit resnet34)')
    # The right arch, another class count (torchvision's 1,000 ImageNet classes on a 10-class val
    # .beton): 'other shapes' and 'resnet18 assumed' pointed at the arch, which was right.
    torch.save(build_model(arch='resnet18', num_classes=1000, use_blurpool=False,
                           channels_last=False).state_dict(), tmp_path / 'resnet18.pt')
    with pytest.raises(CheckpointError) as info:
        weights.load_model(tmp_path / 'resnet18.pt', num_classes=10, arch='resnet18',
                           beton=tmp_path / 'val.beton')
    assert str(info.value) == (
        f"{tmp_path / 'resnet18.pt'}: its classifier has 1000 outputs, but 10 classes are asked "
        f"for (those of {tmp_path / 'val.beton'}): use them on the classes they were trained on, "
        f"or fine-tune them on these")
    # ... unless the .beton's classes are ILSVRC's (Imagenette's, ImageWoof's: refused before):
    # their logits alone, in the .beton's order
    ilsvrc = [wnid for wnid, _ in ilsvrc_classes()]
    picked = [999, 0, 217, 482, 491, 497, 566, 569, 571, 574]
    (tmp_path / 'val.classes.tsv').write_text(''.join(f'{i}\t{ilsvrc[k]}\n'
                                                      for i, k in enumerate(picked)))
    saved = weights.load_model(tmp_path / 'resnet18.pt', num_classes=10, arch='resnet18',
                               use_blurpool=False, beton=tmp_path / 'val.beton')
    whole = weights.load_model(tmp_path / 'resnet18.pt', arch='resnet18', use_blurpool=False)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(saved.model.eval()(images), whole.model.eval()(images)[:, picked])
    assert [wnid for wnid, _ in saved.classes] == [ilsvrc[k] for k in picked]
    assert saved.note == (f"note: {tmp_path / 'resnet18.pt'} has a classifier of 1,000 outputs and "
                          f"no class list: taken as ILSVRC-2012's classes, of which the 10 of "
                          f"{tmp_path / 'val.beton'} are evaluated (their logits alone, as "
                          f"ImageNet-A and -R are)")
    (tmp_path / 'val.classes.tsv').write_text(''.join(f'{i}\tn{i:08d}\n' for i in range(10)))
    with pytest.raises(CheckpointError, match='its classifier has 1000 outputs, but 10 classes'):
        weights.load_model(tmp_path / 'resnet18.pt', num_classes=10, arch='resnet18',
                           beton=tmp_path / 'val.beton')  # not ILSVRC's classes
    backbone = {k: v for k, v in torch.load(tmp_path / 'resnet18.pt').items()
                if not k.startswith('fc.')}  # no classifier: not 'a classifier of 0 outputs'
    torch.save(backbone, tmp_path / 'backbone.pt')
    with pytest.raises(CheckpointError, match=r"backbone.pt: the weights do not fit resnet18 with "
                                              r"10 classes: missing \['fc.bias', 'fc.weight'\]"):
        weights.load_model(tmp_path / 'backbone.pt', num_classes=10, arch='resnet18')


def test_a_runs_weights_are_evaluated_on_a_beton_of_some_of_their_classes(tmp_path):
    """Weights saved with a class list (a run's) on a .beton of some of those classes, in any order
    (ImageNet-A and -R: 200 of the 1,000 a model was trained on): their logits alone, as weights
    of ILSVRC-2012's classes without a class list are evaluated. Refused before, as other
    classes. A .beton with a class the weights lack is still refused."""
    classes = [(f'n{i:08d}', f'class {i}') for i in range(10)]
    weights.save_final_weights(resnet18(10, seed=1).state_dict(), tmp_path / 'final_weights.pt',
                               classes=classes)
    picked = [7, 2, 5]
    (tmp_path / 'val.classes.tsv').write_text(''.join(f'{i}\t{classes[k][0]}\n'
                                                      for i, k in enumerate(picked)))
    kwargs = dict(arch='resnet18', use_blurpool=False, channels_last=False)
    saved = weights.load_model(tmp_path / 'final_weights.pt', num_classes=3,
                               beton=tmp_path / 'val.beton', **kwargs)
    whole = weights.load_model(tmp_path / 'final_weights.pt', **kwargs)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(saved.model.eval()(images), whole.model.eval()(images)[:, picked])
    assert [wnid for wnid, _ in saved.classes] == [classes[k][0] for k in picked]
    assert saved.note == (f"note: {tmp_path / 'final_weights.pt'} was trained on 10 classes, of "
                          f"which the 3 of {tmp_path / 'val.beton'} are evaluated (their logits "
                          f"alone, as ImageNet-A and -R are)")
    (tmp_path / 'val.classes.tsv').write_text('0\tn00000007\n1\tn00000010\n')
    with pytest.raises(CheckpointError, match='was trained on other classes than'):
        weights.load_model(tmp_path / 'final_weights.pt', num_classes=2,
                           beton=tmp_path / 'val.beton', **kwargs)


def test_training_starts_from_model_weights(sample_betons, tmp_path):
    """The run's model (10 classes of the sample) starts from a 7-class ResNet-18's weights."""
    source = resnet18(7, seed=3)
    torch.save(source.state_dict(), tmp_path / 'start.pt')
    run = train.build(small_config(sample_betons, tmp_path, f'--model.weights={tmp_path}/start.pt'),
                      distributed.from_env(), 0.0)
    assert run.model_without_ddp.fc.weight.shape == (10, 512)  # new: the sample has 10 classes
    assert_loaded(run.model_without_ddp, source, head_from_file=False)


def test_a_fine_tuning_run_resumes_after_its_starting_weights_file_is_gone(
        sample_betons, tmp_path, monkeypatch, capsys):
    """--resume continues from the checkpoint's weights and does not read model.weights: the
    file the run started from (downloaded to a scratch folder, say) may be gone. The resume
    loaded it again (to be replaced) and failed when it was missing."""
    optimizer_step, steps = engine.optimizer_step, []

    def signalled_at_step_1(**kwargs):
        optimizer_step(**kwargs)
        steps.append(1)
        if len(steps) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(engine, 'optimizer_step', signalled_at_step_1)
    torch.save(resnet18(7, seed=3).state_dict(), tmp_path / 'start.pt')
    args = ('--training.epochs=1', '--checkpoint.every_iters=1', '--training.batch_size=128',
            f'--model.weights={tmp_path}/start.pt')
    summary = train.main(small_config(sample_betons, tmp_path, *args))
    assert summary['exit_code'] == 143
    assert f'=> started from {tmp_path}/start.pt' in capsys.readouterr().out
    (tmp_path / 'start.pt').unlink()
    summary = train.main(small_config(sample_betons, tmp_path, *args,
                                      f'--resume={summary["run_dir"]}'))
    assert 'exit_code' not in summary and (Path(summary['run_dir']) / 'final_weights.pt').exists()
    assert 'started from' not in capsys.readouterr().out
    assert len(steps) == 340 // 128  # the epoch's iterations, each once


def test_reset_head_needs_weights_and_pretrained_is_refused(sample_betons, tmp_path):
    with pytest.raises(ConfigError, match='model.reset_head=1 needs model.weights'):
        small_config(sample_betons, tmp_path, '--model.reset_head=1')
    with pytest.raises(ConfigError, match='never fetched from the network'):
        small_config(sample_betons, tmp_path, '--model.pretrained=1')
