"""Configuration: the shipped YAML recipes, ffcv-imagenet's own files, and the error messages."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imagenet_ffcv import config, config_warnings
from imagenet_ffcv.config import ConfigError, load_config, to_dict
from imagenet_ffcv.config_files import config_file

REPO = Path(__file__).resolve().parents[1]
# ffcv-imagenet's recipes; the classic ones (rn50_step_90_epochs, rn50_60pct_target) are tested in
# test_recipes.py.
RN50 = sorted((REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs').glob('rn50_[0-9]*_epochs.yaml'))
RN18 = sorted((REPO / 'imagenet_ffcv' / 'configs' / 'rn18_configs').glob('rn18_[0-9]*_epochs.yaml'))
DATA = ['--data.train_dataset=x', '--data.val_dataset=y']
SECTIONS = {'data', 'model', 'resolution', 'lr', 'logging', 'validation', 'training', 'checkpoint',
            'dist'}

# ffcv-imagenet's rn18 88-epoch file as published (data.gpu, lr_tta: true, no ref_batch_size).
ORIGINAL_FFCV_IMAGENET = """\
data:
  gpu: 0
  in_memory: 1
  num_workers: 12
dist:
  world_size: 1
logging:
  folder: /tmp/
  log_level: 0
lr:
  lr: 0.5
  lr_peak_epoch: 2
  lr_schedule_type: cyclic
model:
  arch: resnet18
resolution:
  end_ramp: 76
  max_res: 192
  min_res: 160
  start_ramp: 65
training:
  batch_size: 1024
  bn_wd: 0
  distributed: 0
  epochs: 88
  label_smoothing: 0.1
  momentum: 0.9
  optimizer: sgd
  weight_decay: 5e-5
  use_blurpool: 1
validation:
  lr_tta: true
  resolution: 256
"""


def _load(path, *extra):
    return load_config(['--config', str(path), *DATA, *extra])


def _write(tmp_path, text, name='cfg.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_all_recipe_files_found():
    """Six rn50 and six rn18 recipes ship (16, 24, 32, 40, 56, 88 epochs)."""
    epochs = [16, 24, 32, 40, 56, 88]
    assert [p.name for p in RN50] == sorted(f'rn50_{e}_epochs.yaml' for e in epochs)
    assert [p.name for p in RN18] == sorted(f'rn18_{e}_epochs.yaml' for e in epochs)


@pytest.mark.parametrize('path', RN50 + RN18, ids=lambda p: p.name)
def test_recipe_loads_with_expected_values(path):
    """Every recipe loads; arch, epochs (from the name), lr, ref batch, batch and wd per family."""
    cfg = _load(path)
    family, epochs = re.fullmatch(r'(rn\d+)_(\d+)_epochs\.yaml', path.name).groups()
    assert cfg.training.epochs == int(epochs)
    assert cfg.data.train_dataset == 'x' and cfg.data.val_dataset == 'y'
    assert cfg.logging.folder == 'runs'
    assert cfg.lr.lr_schedule_type == 'cyclic'
    assert cfg.lr.lr_peak_epoch == 2
    assert (cfg.resolution.min_res, cfg.resolution.max_res) == (160, 192)
    assert 0 < cfg.resolution.start_ramp < cfg.resolution.end_ramp < cfg.training.epochs
    assert cfg.training.use_blurpool == 1 and cfg.training.bn_wd == 0
    assert isinstance(cfg.training.weight_decay, float)
    if family == 'rn50':
        assert cfg.model.arch == 'resnet50'
        assert cfg.lr.lr == pytest.approx(1.7) and cfg.lr.ref_batch_size == 4096
        assert cfg.training.batch_size == 512 and cfg.dist.world_size == 8
        assert cfg.training.weight_decay == pytest.approx(1e-4)
    else:
        assert cfg.model.arch == 'resnet18'
        assert cfg.lr.lr == pytest.approx(0.5) and cfg.lr.ref_batch_size == 1024
        assert cfg.training.batch_size == 1024 and cfg.dist.world_size == 1
        assert cfg.training.weight_decay == pytest.approx(5e-5)
    # the global batch the LR was tuned for is the one the file describes
    assert cfg.training.batch_size * cfg.dist.world_size == cfg.lr.ref_batch_size


def test_rn50_16_values():
    """rn50_16: resnet50, lr 1.7 for 4096, batch 512, ramp 11..13, wd 1e-4 (YAML '1e-4' -> float)."""
    cfg = _load(REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_16_epochs.yaml')
    assert cfg.model.arch == 'resnet50'
    assert cfg.lr.lr == pytest.approx(1.7)
    assert cfg.lr.ref_batch_size == 4096
    assert cfg.training.batch_size == 512
    assert (cfg.resolution.start_ramp, cfg.resolution.end_ramp) == (11, 13)
    assert cfg.training.weight_decay == pytest.approx(1e-4)
    assert cfg.training.epochs == 16
    assert cfg.training.label_smoothing == pytest.approx(0.1)
    assert cfg.training.momentum == pytest.approx(0.9)
    assert cfg.validation.resolution == 256 and cfg.validation.lr_tta == 1


def test_rn18_88_values():
    """rn18_88: lr 0.5 for 1024, wd 5e-5, ramp 65..76, 88 epochs."""
    cfg = _load(REPO / 'imagenet_ffcv' / 'configs' / 'rn18_configs' / 'rn18_88_epochs.yaml')
    assert cfg.model.arch == 'resnet18'
    assert cfg.lr.lr == pytest.approx(0.5)
    assert cfg.lr.ref_batch_size == 1024
    assert cfg.training.weight_decay == pytest.approx(5e-5)
    assert (cfg.resolution.start_ramp, cfg.resolution.end_ramp) == (65, 76)
    assert cfg.training.epochs == 88


def test_demo_config_loads_without_overrides():
    """demo_configs/rn18_demo.yaml sets the datasets and folder itself: loads with no other
    argument; it is shipped, so the README's example runs from an installed package."""
    cfg = load_config(['--config', 'demo_configs/rn18_demo.yaml'])  # shipped: any directory
    assert cfg.model.arch == 'resnet18'
    makefile = (REPO / 'Makefile').read_text()  # the demo trains on what `make demo` writes
    assert f'--out {cfg.data.train_dataset}' in makefile
    assert f'--out {cfg.data.val_dataset}' in makefile
    assert cfg.resolution.min_res <= cfg.resolution.max_res <= 128  # within the betons' 128 px
    assert cfg.lr.ref_batch_size == 0  # default: no scaling


def test_original_ffcv_imagenet_config_loads_unchanged(tmp_path):
    """ffcv-imagenet's own file (data.gpu, lr_tta: true) loads as is."""
    cfg = _load(_write(tmp_path, ORIGINAL_FFCV_IMAGENET))
    assert cfg.data.gpu == 0
    assert cfg.validation.lr_tta == 1  # YAML true read as the int flag 1
    assert cfg.logging.folder == '/tmp/' and cfg.logging.log_level == 0
    assert cfg.model.arch == 'resnet18'
    assert cfg.training.epochs == 88 and cfg.training.batch_size == 1024
    assert cfg.training.weight_decay == pytest.approx(5e-5)
    assert cfg.training.distributed == 0
    assert cfg.lr.lr == pytest.approx(0.5) and cfg.lr.ref_batch_size == 0
    assert (cfg.resolution.start_ramp, cfg.resolution.end_ramp) == (65, 76)


def test_a_fraction_for_a_whole_number_key_in_a_file_is_refused_as_on_the_command_line(tmp_path):
    """``epochs: 3.7`` in a file trained 3 epochs and ``batch_size: 48.9`` took 48, without a word
    (``--training.epochs=2.5`` was refused); a whole float (16.0) and true/false for a flag load."""
    path = _write(tmp_path, 'training:\n  epochs: 3.7\n  batch_size: 48.9\n'
                            'data:\n  num_workers: 2.7\n')
    with pytest.raises(ConfigError) as info:
        _load(path)
    assert str(info.value) == (f'{path}: training.epochs: got 3.7, expected a whole number; '
                               'training.batch_size: got 48.9, expected a whole number; '
                               'data.num_workers: got 2.7, expected a whole number')
    cfg = _load(_write(tmp_path, 'training:\n  epochs: 16.0\nvalidation:\n  lr_tta: false\n'),
                '--logging.folder=r')
    assert (cfg.training.epochs, cfg.validation.lr_tta) == (16, 0)


def test_yaml_lists_and_empty_sections_load_as_a_user_writes_them(tmp_path):
    """``betas: [0.9, 0.95]`` was refused ('expected a string': the command line's form is
    0.9,0.95), and a section whose keys are all commented out was 'unknown key(s) training'."""
    cfg = _load(_write(tmp_path, 'training:\n  optimizer: adamw\n  betas: [0.8, 0.95]\n'
                                 'lr:\n  lr_schedule_type: step\n  step_fractions: [0.5, 0.75]\n'
                                 'validation:\n  # resolution: 224\n'), '--logging.folder=r')
    assert (cfg.training.betas, cfg.lr.step_fractions) == ('0.8,0.95', '0.5,0.75')
    assert config.lr_schedule_kwargs(cfg)['step_fractions'] == [0.5, 0.75]
    with pytest.raises(ConfigError, match='model.arch: got'):  # a list for another text key
        _load(_write(tmp_path, 'model:\n  arch: [resnet18, resnet50]\n'), '--logging.folder=r')
    with pytest.raises(ConfigError, match=r'unknown key\(s\) trainig'):  # mistyped, empty
        _load(_write(tmp_path, 'trainig:\n'), '--logging.folder=r')


def test_unknown_key_in_yaml_raises_naming_it(tmp_path):
    """training.warmup_epochs in a file is a ConfigError naming it (fastargs alone ignores it)."""
    path = _write(tmp_path, 'training:\n  epochs: 4\n  warmup_epochs: 5\nlogging:\n  folder: r\n')
    with pytest.raises(ConfigError) as info:
        _load(path)
    assert 'training.warmup_epochs' in str(info.value)


def test_unknown_section_in_yaml_raises_naming_it(tmp_path):
    """A whole unknown section (optim.lr) is named too."""
    path = _write(tmp_path, 'optim:\n  lr: 0.1\nlogging:\n  folder: r\n')
    with pytest.raises(ConfigError, match=r'optim\.lr'):
        _load(path)


def test_unknown_cli_override_raises_naming_it():
    """--training.foo=1 is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        load_config([*DATA, '--logging.folder=r', '--training.foo=1'])
    assert 'training.foo' in str(info.value)


def test_bad_type_raises_naming_key():
    """--training.epochs=abc is a ConfigError naming training.epochs and the bad value."""
    with pytest.raises(ConfigError) as info:
        load_config([*DATA, '--logging.folder=r', '--training.epochs=abc'])
    msg = str(info.value)
    assert 'training.epochs' in msg and 'abc' in msg
    assert 'data.train_dataset' not in msg  # only the bad key is reported


def test_bad_choice_raises_naming_key():
    """--lr.lr_schedule_type=exponential is not one of the schedules."""
    with pytest.raises(ConfigError, match='lr.lr_schedule_type'):
        load_config([*DATA, '--logging.folder=r', '--lr.lr_schedule_type=exponential'])


def test_missing_required_key_raises_naming_it():
    """Without data.train_dataset the error names it as required, and only it."""
    with pytest.raises(ConfigError) as info:
        load_config(['--config', str(REPO / 'imagenet_ffcv' / 'configs' / 'rn18_configs' / 'rn18_16_epochs.yaml'),
                     '--data.val_dataset=y'])
    msg = str(info.value)
    assert 'data.train_dataset' in msg and 'required' in msg
    assert 'data.val_dataset' not in msg
    # eval-only reads no training .beton
    cfg = load_config(['--config', 'rn50_configs/rn50_16_epochs.yaml', '--data.val_dataset=y',
                       '--training.eval_only=1', '--model.weights=w.pt'])
    assert cfg.data.train_dataset == '' and cfg.training.eval_only == 1


def test_logging_folder_is_required_to_train_and_not_to_evaluate():
    """A run needs logging.folder (the error names it); eval-only writes nothing, and loads
    without one."""
    with pytest.raises(ConfigError, match='logging.folder: required, not set') as info:
        load_config(['--data.train_dataset=x', '--data.val_dataset=y'])
    assert 'data.' not in str(info.value)
    cfg = load_config(['--data.val_dataset=y', '--training.eval_only=1', '--model.weights=w.pt'])
    assert cfg.logging.folder == '' and cfg.training.eval_only == 1
    # nothing given: every missing key at once (the val .beton came first, alone, then the rest)
    with pytest.raises(ConfigError) as info:
        load_config([])
    assert str(info.value) == (
        'invalid configuration:\n  data.train_dataset: required, not set (the training .beton)'
        '\n  data.val_dataset: required, not set (the validation .beton)\n  logging.folder: '
        'required, not set (runs are written to FOLDER/<run id>/)')


def test_missing_config_file_raises_file_not_found(tmp_path):
    """A config path that does not exist is a FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / 'nope.yaml')


def test_cli_override_beats_file():
    """--training.epochs=3 wins over the file's 16, and arrives as an int."""
    cfg = _load(REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_16_epochs.yaml', '--training.epochs=3')
    assert cfg.training.epochs == 3 and isinstance(cfg.training.epochs, int)
    cfg = _load(REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_16_epochs.yaml', '--lr.lr=0.8')
    assert cfg.lr.lr == pytest.approx(0.8)


def test_a_typo_in_a_key_gets_a_suggestion_and_bad_yaml_one_line(tmp_path):
    """An unknown key, on the command line or in a file, is answered with the closest known
    key (the list of all keys alone was a 1.4 kB line); a config file that is not valid YAML is
    a ConfigError naming the file and the position (a 40-line traceback)."""
    with pytest.raises(ConfigError, match=r'--weights w.pt \(did you mean model.weights\?\)'):
        load_config(['--weights', 'w.pt'])  # a key without its section (predict's option)
    with pytest.raises(ConfigError, match=r'--batch_size=8 \(did you mean validation.batch_size, '
                                          r'training.batch_size\?\)'):
        load_config(['--batch_size=8'])
    with pytest.raises(ConfigError, match=r'--training.epoch=3 \(did you mean training.epochs\?\)'):
        load_config([*DATA, '--training.epoch=3'])
    typo = _write(tmp_path, 'lr:\n  lr_peak_epochs: 2\n')
    with pytest.raises(ConfigError, match=r'lr.lr_peak_epochs \(did you mean lr.lr_peak_epoch\?\)'):
        load_config(['--config', str(typo), *DATA])
    bad = _write(tmp_path, 'training:\n  epochs: 3\n bad: 1\n', 'bad.yaml')
    with pytest.raises(ConfigError, match=r'bad.yaml: not valid YAML: .*line 3, column 2') as info:
        load_config(['--config', str(bad), *DATA])
    assert '\n' not in str(info.value)
    # a key in another section: that one is named (training.epochs was, and taken set the run's
    # length), and the message ends without the 71 keys (a 1.5 kB line)
    with pytest.raises(ConfigError) as info:
        load_config([*DATA, '--training.warmup_epochs=5'])
    assert str(info.value) == ('unknown argument(s) --training.warmup_epochs=5 (did you mean '
                               'lr.warmup_epochs?); --help lists every key')
    wrong = _write(tmp_path, 'lr:\n  momentum: 0.8\n', 'wrong.yaml')
    with pytest.raises(ConfigError, match=r'lr.momentum \(did you mean training.momentum\?\); '
                                          r'docs/configuration.md \(or the trainer\'s --help\) '
                                          r'lists every key$'):
        load_config(['--config', str(wrong), *DATA])


def test_a_runs_params_json_gives_its_config_back(tmp_path):
    """params.json as --config was refused for the sections a run adds (derived, code, launch)."""
    cfg = load_config([*DATA, '--logging.folder=x', '--training.epochs=7', '--lr.lr=0.3'])
    params = tmp_path / 'params.json'
    params.write_text(json.dumps({**to_dict(cfg), 'derived': {'world_size': 8},
                                  'code': {'version': '1'}, 'launch': None}))
    assert to_dict(load_config(['--config', str(params)])) == to_dict(cfg)


def test_what_yaml_reads_but_the_user_did_not_mean_is_refused_naming_the_key(tmp_path):
    """Each was taken without a word: a second training: section replaced the first whole (its
    weight decay back at the default), a key given twice took the later value, epochs: true ran
    1 epoch, a blank epochs: the default, and nan or inf a run that failed as a non-finite loss.
    A file that is not text was a UnicodeDecodeError traceback; UTF-16 (PowerShell's) loads. An
    empty file (a copy cut short), or one of comments only, ran on the defaults."""
    twice = _write(tmp_path, 'training:\n  epochs: 4\n  weight_decay: 1e-4\nlr:\n  lr: 0.5\n'
                             'training:\n  epochs: 3\n', 'twice.yaml')
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: .*'training' given twice "
                                          r"\(lines 1 and 6\): YAML keeps the later alone \(of a "
                                          r"section, none of the earlier's keys\); give it once"):
        load_config(['--config', str(twice), *DATA])
    key_twice = _write(tmp_path, 'lr:\n  lr: 0.5\n  lr: 0.1\n', 'key.yaml')
    with pytest.raises(ConfigError, match=r"'lr' given twice \(lines 2 and 3\)"):
        load_config(['--config', str(key_twice), *DATA])
    listed = _write(tmp_path, 'training:\n  ? [a, b]\n  : 1\n', 'listed.yaml')  # (a traceback)
    with pytest.raises(ConfigError, match=r'listed.yaml: not valid YAML: .*unhashable key'):
        load_config(['--config', str(listed), *DATA])
    for content, said in (('epochs: true', "training.epochs: got True (YAML reads yes/no, on/off "
                                           "and true/false so; quote a word), expected"),
                          ('epochs:', 'training.epochs: no value; give one, or remove the line '
                                      'for the default')):
        odd = _write(tmp_path, f'training:\n  {content}\n  use_blurpool: yes\n', 'odd.yaml')
        with pytest.raises(ConfigError, match=re.escape(f'odd.yaml: {said}')):
            load_config(['--config', str(odd), *DATA])
    scalar = _write(tmp_path, 'training: 5\nlr:\n  lr: 0.5\n', 'scalar.yaml')  # was 'unknown
    with pytest.raises(ConfigError, match=re.escape(  # key(s) training (did you mean training.amp?)'
            'scalar.yaml: training: 5: a section holds keys (training:\n  epochs: 16), not a '
            'value')):
        load_config(['--config', str(scalar), *DATA])
    on = _write(tmp_path, 'training:\n  use_blurpool: yes\n  distributed: true\n', 'on.yaml')
    cfg = load_config(['--config', str(on), *DATA, '--logging.folder=x'])
    assert cfg.training.use_blurpool == 1
    with pytest.raises(ConfigError, match=r'^lr.lr=inf, training.momentum=nan: not a finite '
                                          r'number; give a number$'):
        load_config([*DATA, '--lr.lr=inf', '--training.momentum=nan'])
    for content in ('', '# training:\n#   epochs: 3\n\n', '---\n', 'null\n', '{}\n'):
        empty = _write(tmp_path, content, 'empty.yaml')
        with pytest.raises(ConfigError, match=r'empty.yaml: no sections \(it is empty, or holds '
                                              r'only comments, null or \{\}\)'):
            load_config(['--config', str(empty), *DATA, '--logging.folder=x'])
    utf16 = tmp_path / 'utf16.yaml'
    utf16.write_text('training:\n  epochs: 3\n', encoding='utf-16')
    assert load_config(['--config', str(utf16), *DATA,
                        '--logging.folder=x']).training.epochs == 3
    beton = tmp_path / 'train.beton'
    beton.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match='train.beton: not valid YAML: '):
        load_config(['--config', str(beton), *DATA])


def test_a_ramp_that_ends_after_the_last_epoch_is_warned_of():
    """The 16-epoch recipe's ramp (160 px to 192 from epoch 11 to 13) cut to 8 epochs never leaves
    160 px: a warning names the keys and the last epoch's resolution; the whole recipe, and a
    run whose last epoch reaches max_res on the ramp's end, get none."""
    recipe = REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_16_epochs.yaml'
    warning = config_warnings.unreached_resolution(_load(recipe, '--training.epochs=8'))
    assert warning.startswith('the last epoch (7: training.epochs=8) trains at 160 px, not '
                              'resolution.max_res=192: the ramp from resolution.start_ramp=11')
    assert 'resolution.end_ramp=13' in warning
    assert 'trains at 160 px' in config_warnings.unreached_resolution(_load(recipe, '--training.epochs=12'))
    # a ramp at epoch 0 (start_ramp, the last epoch at min_res, is 0): a 1-epoch run stays at min
    assert 'resolution.start_ramp=0 (the last epoch at min_res)' in config_warnings.unreached_resolution(
        _load(recipe, '--training.epochs=1', '--resolution.start_ramp=0', '--resolution.end_ramp=0',
              '--lr.lr_peak_epoch=1'))
    assert config_warnings.unreached_resolution(_load(recipe)) is None
    assert config_warnings.unreached_resolution(_load(recipe, '--training.epochs=13')) is None  # 192 px


def test_gradients_accumulated_past_an_epochs_batches_are_warned_of():
    """grad_accum_steps=100 on 340 images in batches of 16 (21 an epoch) reported a global batch
    of 1,600 and made one optimizer step an epoch, without a word."""
    cfg = load_config([*DATA, '--logging.folder=x', '--training.batch_size=16',
                       '--training.grad_accum_steps=100'])
    assert config_warnings.accumulated_past_the_epoch(
        cfg, {'derived': {'train_images': 340, 'world_size': 1}}) == (
        'training.grad_accum_steps=100 is more than the 21 batches of an epoch (340 images, 16 per '
        'process x 1 process(es)): each epoch makes one optimizer step, of 21 batches, and the '
        'global batch and the LR scaled to it count 100; lower it to at most 21')
    assert config_warnings.accumulated_past_the_epoch(
        cfg, {'derived': {'train_images': 1600, 'world_size': 1}}) is None


def test_images_stored_smaller_than_the_runs_resolutions_are_warned_of():
    """The ResNet-50 recipe (192 px, validation at 256) on .beton files written at --max-res 64
    upscaled every image without a word; at --max-res 256 (ImageNet's, whose 224 px centre crops
    validation upscales to 256 by design) it warns of nothing."""
    recipe = REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_16_epochs.yaml'
    cfg = _load(recipe)
    assert config_warnings.upscaled(cfg, {'derived': {'val_image_side': 64}}) == (
        'resolution.max_res=192 and validation.resolution=256 above the shorter sides y stores '
        '(up to 64 px): every image is upscaled, at the cost of those sides without their '
        'detail; lower the resolutions, or, where the images are larger, write the .beton files '
        'at a larger --max-res (256, as for ImageNet)')
    assert config_warnings.upscaled(cfg, {'derived': {'val_image_side': 160}}).startswith(
        'resolution.max_res=192 and validation.resolution=256 above the shorter sides y stores '
        '(up to 160 px)')
    assert config_warnings.upscaled(cfg, {'derived': {'val_image_side': 256}}) is None


def test_settings_that_do_nothing_in_the_runs_setup_are_warned_of(tmp_path):
    """A value read by nothing loaded silently: momentum with AdamW, betas with SGD, a RandAugment
    magnitude without RandAugment, step_length beside step_fractions, ema_every without EMA. Each
    is named with the set-up that uses it; a key at its default is not (ffcv-imagenet's configs
    set momentum: 0.9 whatever the optimizer), and no shipped config gets a warning."""
    from imagenet_ffcv.config_warnings import ignored_settings
    recipe = REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_16_epochs.yaml'
    warnings = ignored_settings(to_dict(_load(
        recipe, '--training.optimizer=adamw', '--training.momentum=0.8', '--training.ema_every=4',
        '--training.ra_magnitude=15', '--lr.lr_schedule_type=step', '--lr.step_length=10',
        '--lr.step_fractions=1/2', '--lr.lr_peak_epoch=3')))
    assert warnings == [
        'lr.lr_peak_epoch=3.0 does nothing here: it is used only with lr.lr_schedule_type=cyclic',
        'lr.step_length=10 does nothing here: it is used only with lr.lr_schedule_type=step '
        'without lr.step_fractions (which win)',
        'training.momentum=0.8 does nothing here: it is used only with training.optimizer=sgd',
        'training.ra_magnitude=15 does nothing here: it is used only with training.auto_augment=ra',
        'training.ema_every=4 does nothing here: it is used only with training.ema_decay > 0']
    assert ignored_settings(to_dict(_load(recipe, '--lr.poly_power=2'))) == [
        'lr.poly_power=2.0 does nothing here: it is used only with lr.lr_schedule_type=poly']
    assert ignored_settings(to_dict(_load(recipe, '--training.betas=0.9,0.95'))) == [
        "training.betas='0.9,0.95' does nothing here: it is used only with "
        'training.optimizer=adamw or lamb']
    assert ignored_settings(to_dict(_load(recipe, '--training.optimizer=adamw'))) == []
    assert ignored_settings(to_dict(_load(recipe, '--validation.results_file=r.json'))) == [
        "validation.results_file='r.json' does nothing here: it is used only with "
        'training.eval_only=1 (a training run writes RUN_DIR/results.json)']
    assert ignored_settings(to_dict(_load(recipe, '--validation.results_file=r.json',
                                          '--training.eval_only=1', '--model.weights=w.pt'))) == []
    shipped = [*sorted((REPO / 'imagenet_ffcv' / 'configs').glob('*/*.yaml')),  # the demo's too
               _write(tmp_path, ORIGINAL_FFCV_IMAGENET)]
    assert len(shipped) == 17
    assert {p.name: ignored_settings(to_dict(_load(p))) for p in shipped} == {
        p.name: [] for p in shipped}


def test_an_ffcv_imagenet_config_for_8_processes_run_on_fewer_is_warned_of(tmp_path):
    """ffcv-imagenet's rn50 configs say dist.world_size: 8 and lr 1.7 for that global batch of
    4096; its launcher started the 8 processes itself (training.distributed=1). Run without
    torchrun here, such a file trained one process at lr 1.7 with batch 512, without a word. A
    warning says so and what to set; the same config on 8 processes, the shipped copy (which sets
    lr.ref_batch_size) and a config for one process get none."""
    from imagenet_ffcv.config_warnings import unscaled_recipe
    original = _write(tmp_path, ORIGINAL_FFCV_IMAGENET.replace('world_size: 1', 'world_size: 8')
                      .replace('batch_size: 1024', 'batch_size: 512').replace('lr: 0.5', 'lr: 1.7')
                      .replace('distributed: 0', 'distributed: 1'))

    def resolved(path, world_size, accumulation=1):
        cfg = _load(path, f'--training.grad_accum_steps={accumulation}')
        return {**to_dict(cfg), 'derived': {
            'world_size': world_size, 'global_batch_size': 512 * world_size * accumulation}}
    assert unscaled_recipe(resolved(original, 1)) == (
        'the config was written for dist.world_size=8 processes of training.batch_size=512 (a '
        "global batch of 4096), and this run's global batch is 512 (1 process(es) x 512 x "
        'training.grad_accum_steps=1), with lr.lr=1.7 used as is (lr.ref_batch_size=0): set '
        'lr.ref_batch_size=4096 to scale the LR to this batch, or keep the batch (torchrun '
        '--nproc_per_node=8, or training.grad_accum_steps; this tool starts no processes itself, '
        "as ffcv-imagenet's training.distributed=1 did)")
    assert 'global batch is 2048 (2 process(es) x 512 x training.grad_accum_steps=2)' in \
        unscaled_recipe(resolved(original, 2, accumulation=2))
    assert unscaled_recipe(resolved(original, 8)) is None
    assert unscaled_recipe(resolved(original, 1, accumulation=8)) is None  # the recipe's batch
    shipped = REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_88_epochs.yaml'
    assert unscaled_recipe(resolved(shipped, 1)) is None
    assert unscaled_recipe(resolved(_write(tmp_path, ORIGINAL_FFCV_IMAGENET, 'one.yaml'), 1)) is None


def test_an_on_off_key_takes_0_or_1_only(tmp_path):
    """``--validation.lr_tta=2`` or ``use_blurpool: 2`` loaded as on, without a word; they are
    refused naming the key, while YAML's true/false still load as 1/0, and the same words on the
    command line (``--training.bn_wd=true`` was refused where ``bn_wd: true`` loaded)."""
    with pytest.raises(ConfigError, match=r"validation.lr_tta: got '2', expected 0 or 1"):
        load_config([*DATA, '--logging.folder=r', '--validation.lr_tta=2'])
    with pytest.raises(ConfigError, match=r'training.use_blurpool: got 2, expected 0 or 1'):
        _load(_write(tmp_path, 'training:\n  use_blurpool: 2\n'), '--logging.folder=r')
    cfg = _load(_write(tmp_path, 'training:\n  use_blurpool: false\n  compile: true\n'),
                '--logging.folder=r')
    assert (cfg.training.use_blurpool, cfg.training.compile) == (0, 1)
    cfg = load_config([*DATA, '--logging.folder=r', '--training.bn_wd=true',
                       '--validation.lr_tta=Off', '--training.compile=yes'])
    assert (cfg.training.bn_wd, cfg.validation.lr_tta, cfg.training.compile) == (1, 0, 1)
    with pytest.raises(ConfigError, match=r"training.bn_wd: got 'maybe', expected 0 or 1"):
        load_config([*DATA, '--logging.folder=r', '--training.bn_wd=maybe'])
    # ffcv-imagenet's log_level 2 (validate every epoch, its loss in the bar) still loads
    assert load_config([*DATA, '--logging.folder=r', '--logging.log_level=2']).logging.log_level == 2
    with pytest.raises(ConfigError, match=r'logging.log_level=-1 must be >= 0'):
        load_config([*DATA, '--logging.folder=r', '--logging.log_level=-1'])


def test_later_config_file_wins(tmp_path):
    """A second --config overrides the first for the keys it sets, the rest is kept."""
    extra = _write(tmp_path, 'training:\n  epochs: 5\n', 'extra.yaml')
    cfg = load_config(['--config', str(REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_16_epochs.yaml'),
                       '--config', str(extra), *DATA])
    assert cfg.training.epochs == 5
    assert cfg.model.arch == 'resnet50' and cfg.lr.lr == pytest.approx(1.7)


def test_defaults_without_file():
    """With only the required keys, defaults apply (16 epochs, resnet50, cyclic, no LR scaling)."""
    cfg = load_config([*DATA, '--logging.folder=r'])
    assert cfg.training.epochs == 16 and cfg.model.arch == 'resnet50'
    assert cfg.lr.lr_schedule_type == 'cyclic' and cfg.lr.ref_batch_size == 0


def test_to_dict_round_trip(tmp_path):
    """to_dict gives {'section': {...}} with every section; written back as YAML it loads the same."""
    cfg = _load(REPO / 'imagenet_ffcv' / 'configs' / 'rn18_configs' / 'rn18_88_epochs.yaml', '--training.epochs=3')
    d = to_dict(cfg)
    assert set(d) == SECTIONS
    assert d['training']['epochs'] == 3
    assert d['model'] == {'arch': 'resnet18', 'pretrained': 0, 'weights': '', 'reset_head': 0}
    json.dumps(d)  # params.json: serialisable
    path = _write(tmp_path, yaml.safe_dump(d), 'round.yaml')
    again = load_config(['--config', str(path)])
    assert to_dict(again) == d


def test_train_imagenet_rejects_unknown_key():
    """train_imagenet.py exits non-zero and names training.nope on stderr."""
    proc = subprocess.run(
        [sys.executable, 'train_imagenet.py', '--config', 'rn18_configs/rn18_16_epochs.yaml',
         '--training.nope=1'],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert 'training.nope' in proc.stderr
    assert 'Traceback' not in proc.stderr  # a clean message, not a crash


def test_inconsistent_keys_are_rejected_before_any_work():
    """The LR peak after the last epoch, and a resolution ramp that runs backwards, are errors
    naming the keys, raised by load_config (not as a traceback in the middle of epoch 0); a run
    shortened with training.epochs alone is told to set the peak too, with a value."""
    base = ['--data.train_dataset=x', '--data.val_dataset=y', '--logging.folder=z']
    with pytest.raises(ConfigError, match=r'lr\.lr_peak_epoch=2\.0 must lie in \[0, training\.'
                                          r'epochs=1\] \(a shorter run needs its own, e\.g\. '
                                          r'--lr\.lr_peak_epoch=0\.125\)'):
        load_config(base + ['--training.epochs=1'])
    with pytest.raises(ConfigError, match='resolution.start_ramp'):
        load_config(base + ['--resolution.start_ramp=5', '--resolution.end_ramp=3'])
    with pytest.raises(ConfigError, match='training.batch_size=0 must be >= 1'):
        load_config(base + ['--training.batch_size=0'])


def test_resume_eval_and_fault_keys():
    """--resume is shorthand for checkpoint.resume; eval_only and model.weights go together;
    checkpoint.every_iters, dist.timeout_s, data.min_crop_scale and data.flip_prob are
    range-checked."""
    base = ['--data.train_dataset=x', '--data.val_dataset=y', '--logging.folder=z']
    assert load_config(base + ['--resume', 'auto']).checkpoint.resume == 'auto'
    assert load_config(base + ['--checkpoint.resume=runs/a/checkpoint.pt']).checkpoint.resume == \
        'runs/a/checkpoint.pt'
    cfg = load_config(base)
    assert (cfg.checkpoint.resume, cfg.checkpoint.every_iters, cfg.dist.timeout_s) == ('', 0, 300)
    assert (cfg.data.min_crop_scale, cfg.data.flip_prob) == (0.08, 0.5)
    with pytest.raises(ConfigError, match='needs model.weights'):
        load_config(base + ['--training.eval_only=1'])
    assert load_config(base + ['--model.weights=w.pt']).model.weights == 'w.pt'  # fine-tuning
    with pytest.raises(ConfigError, match='exclude each other'):
        load_config(base + ['--training.eval_only=1', '--model.weights=w.pt', '--resume=auto'])
    for bad, key in (('--checkpoint.every_iters=-1', 'checkpoint.every_iters'),
                     ('--dist.timeout_s=0', 'dist.timeout_s'),
                     ('--data.min_crop_scale=0', 'data.min_crop_scale'),
                     ('--data.flip_prob=1.5', 'data.flip_prob'),
                     ('--logging.run_name=a/b', 'logging.run_name'),
                     ('--logging.run_name=..', 'logging.run_name'),
                     ('--model.pretrained=1', 'model.pretrained'),
                     ('--training.grad_accum_steps=0', 'training.grad_accum_steps')):
        with pytest.raises(ConfigError, match=key):
            load_config(base + [bad])
    assert load_config(base + ['--logging.run_name=rn50_a.1-x']).logging.run_name == 'rn50_a.1-x'
    from imagenet_ffcv.config import images_per_step  # the LR scaling's batch counts accumulation
    assert images_per_step(load_config(base + ['--training.batch_size=16',
                                               '--training.grad_accum_steps=4'])) == 64


# ----------------------------------------------------------------------------- training options
# The keys that tests/data/shipped_configs_resolved.json does not record (the training options and
# the decoder choice), at their defaults: every option off, our fused decoder.
OPTION_DEFAULTS = {
    'lr.min_lr': 0.0, 'training.betas': '0.9,0.999', 'training.clip_grad_norm': 0.0,
    'training.ema_decay': 0.0, 'training.ema_every': 1, 'training.mixup_alpha': 0.0,
    'training.cutmix_alpha': 0.0, 'training.compile': 0, 'checkpoint.keep_best': 0,
    'logging.tensorboard': 0, 'logging.wandb_project': '', 'logging.every_iters': 50,
    'logging.run_name': '', 'checkpoint.keep_last': 0, 'training.grad_accum_steps': 1,
    'training.sync_bn': 0, 'model.reset_head': 0, 'training.auto_augment': '',
    'training.ra_magnitude': 9, 'training.random_erase': 0.0,
    'data.decoder': 'fused', 'validation.results_file': ''}


def test_shipped_configs_resolve_to_their_recorded_values_with_every_option_off():
    """Every shipped config resolves to the values recorded for it in
    tests/data/shipped_configs_resolved.json, and every key not recorded there to its off default:
    an option never changes a shipped recipe unless its file asks for it."""
    from imagenet_ffcv.config import flatten
    snapshot = json.loads((REPO / 'tests' / 'data' / 'shipped_configs_resolved.json').read_text())
    assert len(snapshot['resolved']) == 15
    for name, before in snapshot['resolved'].items():
        now = flatten(to_dict(load_config(['--config', name,
                                           *snapshot['overrides']])))
        assert now == {**before, **OPTION_DEFAULTS}, name


def test_shipped_configs_take_each_process_share_of_the_cores():
    """The shipped configs' loader threads are 'auto' (ffcv-imagenet's say 12 per process: 96
    threads for the 8 processes of a 64-core node in training.md's SLURM lines)."""
    configs = sorted((REPO / 'imagenet_ffcv' / 'configs').glob('rn*_configs/*.yaml'))
    assert len(configs) == 15
    assert {path.name: _load(path).data.num_workers for path in configs} == {
        path.name: 'auto' for path in configs}


def test_ema_cosine_recipe_is_the_88_epoch_recipe_with_ema_and_cosine():
    from imagenet_ffcv.config import flatten
    base = flatten(to_dict(_load(REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_88_epochs.yaml')))
    ema = flatten(to_dict(_load(REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_88_epochs_ema_cosine.yaml')))
    changed = {k: ema[k] for k in base if base[k] != ema[k]}
    assert changed == {'lr.lr_schedule_type': 'cosine', 'lr.warmup_epochs': 2.0,
                       'training.ema_decay': 0.9965, 'training.ema_every': 4,
                       'checkpoint.keep_best': 1}
    text = (REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_88_epochs_ema_cosine.yaml').read_text()
    assert 'NOT been measured' in text


@pytest.mark.parametrize('override, message', [
    ('--training.ema_decay=1', r'training.ema_decay=1.0 must lie in \[0, 1\)'),
    ('--training.ema_every=0', 'training.ema_every=0 must be >= 1'),
    ('--training.mixup_alpha=-1', 'training.mixup_alpha=-1.0 must be >= 0'),
    ('--training.clip_grad_norm=-0.5', 'training.clip_grad_norm=-0.5 must be >= 0'),
    ('--training.betas=0.9', "training.betas='0.9': expected two numbers"),
    ('--training.betas=a,b', "training.betas='a,b': expected two numbers"),
    ('--lr.min_lr=0.1', 'lr.min_lr=0.1 is only used by lr.lr_schedule_type=cosine'),
    ('--lr.warmup_epochs=3', 'lr.warmup_epochs=3.0 is after lr.lr_peak_epoch=2'),  # cyclic
    ('--training.optimizer=adam', 'training.optimizer'),
    ('--logging.every_iters=0', 'logging.every_iters=0 must be >= 1'),
    ('--dist.timeout_s=0', 'dist.timeout_s=0 must be >= 1'),
    ('--checkpoint.keep_last=-1', 'checkpoint.keep_last=-1 must be >= 0'),
    ('--lr.ref_batch_size=-1', 'lr.ref_batch_size=-1 must be >= 0'),
    # a traceback at the first step before, or (weight decay) training with it
    ('--training.label_smoothing=1.5', r'training.label_smoothing=1.5 must lie in \[0, 1\)'),
    ('--training.momentum=-1', 'training.momentum=-1.0 must be >= 0'),
    ('--training.weight_decay=-1', 'training.weight_decay=-1.0 must be >= 0'),
    ('--lr.lr=-1', 'lr.lr=-1.0 must be > 0'),
    ('--data.val_dataset=', 'data.val_dataset: required, not set')])  # was '.: .beton ...'
def test_option_keys_are_checked_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(['--data.train_dataset=x', '--data.val_dataset=y', '--logging.folder=z',
                     override])


def test_a_warm_up_that_takes_the_whole_run_of_a_decaying_schedule_is_refused():
    """cosine and linear decay after the warm-up: one as long as the run rose to lr.lr and ended
    there, without a word. A shorter one loads; step and poly, which decay under it, too."""
    run = ['--data.train_dataset=x', '--data.val_dataset=y', '--logging.folder=z',
           '--training.epochs=8', '--lr.warmup_epochs=8']
    for schedule in ('cosine', 'linear'):
        with pytest.raises(ConfigError, match=rf'lr.warmup_epochs=8.0 takes all training.epochs=8: '
                                              rf'the {schedule} decay starts after the warm-up'):
            load_config([*run, f'--lr.lr_schedule_type={schedule}'])
        assert load_config([*run, f'--lr.lr_schedule_type={schedule}',
                            '--lr.warmup_epochs=7.5']).lr.warmup_epochs == 7.5
    assert load_config([*run, '--lr.lr_schedule_type=poly']).lr.warmup_epochs == 8


def test_option_keys_load_when_valid():
    cfg = load_config(['--data.train_dataset=x', '--data.val_dataset=y', '--logging.folder=z',
                       '--lr.lr_schedule_type=cosine', '--lr.min_lr=0.01',
                       '--training.optimizer=adamw', '--training.betas=0.8,0.95',
                       '--training.ema_decay=0.999', '--training.mixup_alpha=0.2'])
    assert (cfg.lr.lr_schedule_type, cfg.lr.min_lr, cfg.training.optimizer) == \
        ('cosine', 0.01, 'adamw')
    from imagenet_ffcv.optimizers import parse_betas
    assert parse_betas(cfg.training.betas) == (0.8, 0.95)


def test_help_groups_keys_by_section_and_shows_each_default(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(['--help'])
    assert info.value.code == 0
    out = capsys.readouterr().out
    headings = [line.split(':')[0] for line in out.splitlines()
                if line and not line.startswith(' ') and line.endswith(':')]
    assert headings[1:] == ['data', 'model', 'resolution', 'lr', 'logging', 'validation',
                            'training', 'checkpoint', 'dist']  # after 'options'
    flat = ' '.join(out.split())
    assert '--training.ema_decay VALUE EMA of the weights' in flat
    assert "(default: 'resnet50')" in flat and '(default: 0.08)' in flat
    assert "training .beton file (required, but with training.eval_only=1) (default: '')" in flat
    lr_section = out.split('\nlr: ')[1].split('\nlogging: ')[0]
    assert '--lr.min_lr' in lr_section and '--training.' not in lr_section


def test_help_names_the_command_as_run(monkeypatch, capsys):
    """``python -m imagenet_ffcv.train --help`` said 'usage: train.py' (argparse takes the base
    name of sys.argv[0], the module's file); the console script and the checkout's script give
    their own names."""
    for argv0, name in ((str(Path(config.__file__).with_name('train.py')),
                         'python -m imagenet_ffcv.train'),
                        ('/venv/bin/imagenet-ffcv-train', 'imagenet-ffcv-train'),
                        ('train_imagenet.py', 'train_imagenet.py')):
        monkeypatch.setattr(sys, 'argv', [argv0, '--help'])
        with pytest.raises(SystemExit):
            load_config(['--help'])
        assert capsys.readouterr().out.startswith(f'usage: {name} [--config FILE.yaml ...]')


def test_num_workers_auto_shares_this_process_cores_among_the_node_processes(monkeypatch):
    """data.num_workers=auto: the cores this process may use / the node's processes - 1 (at
    least 1); a number is taken as it is, but capped at the threads numba may start (a config
    written for a 12-core machine runs on 2 cores)."""
    import numba
    import torch
    from imagenet_ffcv import cores, distributed
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(16)))
    monkeypatch.setattr(cores, 'cpu_quota', lambda: None)  # (a CI container's would count)
    monkeypatch.setattr(numba.config, 'NUMBA_NUM_THREADS', 16)

    def node(processes):
        return distributed.DistInfo(rank=0, world_size=2 * processes, local_rank=0,
                                    device=torch.device('cpu'), local_world_size=processes)
    assert [distributed.loader_threads('auto', node(n)) for n in (1, 4, 8, 16)] == [15, 3, 1, 1]
    assert distributed.loader_threads(12, node(1)) == 12
    monkeypatch.setattr(numba.config, 'NUMBA_NUM_THREADS', 2)
    assert distributed.loader_threads(12, node(1)) == 2
    assert distributed.loader_threads('auto', node(1)) == 2
    env = {'RANK': '5', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '4'}
    assert distributed.from_env(env).local_world_size == 4
    assert load_config(['--data.train_dataset=a', '--data.val_dataset=b',
                        '--logging.folder=c']).data.num_workers == 'auto'


# Two ranks of one machine in a gloo group: loader_threads('auto') for three ways of giving them
# the 16 cores that os.sched_getaffinity is made to return.
TWO_RANKS_ON_16_CORES = """
import os, numba, torch.distributed
from imagenet_ffcv import cores, distributed
numba.config.NUMBA_NUM_THREADS = 16
cores.cpu_quota = lambda: None  # (a CI container's would count)
info = distributed.from_env()
distributed.setup(info, timeout_s=60)
r = info.rank
for binding, on in [('shared', range(16)), ('each its own 8', range(8 * r, 8 * r + 8)),
                    ('overlapping', range(0, 12) if r == 0 else range(8, 16))]:
    os.sched_getaffinity = lambda pid: set(on)
    print(binding, distributed.loader_threads('auto', info), flush=True)
# a CPU quota of 6 CPUs: one container for both ranks, or one each (a pod per GPU); with each
# rank bound to 8 cores of its own in one container of 6 CPUs
os.sched_getaffinity = lambda pid: set(range(16))
for where, cgroup in [('one container', 7), ('a container each', 7 + r)]:
    cores.cpu_quota = lambda: cores.Quota(6.0, cgroup)
    print(where, distributed.loader_threads('auto', info), flush=True)
os.sched_getaffinity = lambda pid: set(range(8 * r, 8 * r + 8))
cores.cpu_quota = lambda: cores.Quota(6.0, 7)
print('bound, one container', distributed.loader_threads('auto', info), flush=True)
torch.distributed.barrier()  # rank 0 hosts the store: neither leaves before the other is done
distributed.cleanup()  # a process group left to the interpreter's exit may abort it
"""


@pytest.mark.slow
def test_the_usable_cores_are_at_most_the_slurm_tasks_cpus(monkeypatch):
    """On a SLURM cluster that binds no task to its cores, the affinity holds the whole node:
    SLURM_CPUS_PER_TASK (--cpus-per-task) caps the count (the loader threads of 'auto', the
    converter's processes)."""
    from imagenet_ffcv import cores
    monkeypatch.setattr(cores, 'affinity', lambda: set(range(64)))
    monkeypatch.setattr(cores, 'cpu_quota', lambda: None)
    monkeypatch.delenv('SLURM_CPUS_PER_TASK', raising=False)
    assert cores.usable_cores() == 64
    monkeypatch.setenv('SLURM_CPUS_PER_TASK', '16')
    assert cores.usable_cores() == 16
    monkeypatch.setenv('SLURM_CPUS_PER_TASK', '128')  # never more than the affinity
    assert cores.usable_cores() == 64


@pytest.mark.parametrize('version', ['v2', 'v1'])
def test_the_usable_cores_are_at_most_a_cgroups_cpu_quota(tmp_path, monkeypatch, version):
    """A container's --cpus or a Kubernetes CPU limit is a cgroup CPU quota, which the affinity
    does not show: a pod limited to 6.5 CPUs of a 64-core node took 64 cores for its loader
    threads and writer processes, all throttled to 6.5 cores' time. The least quota of the
    process's cgroup and those above it counts, in whole CPUs; none: the affinity."""
    from imagenet_ffcv import cores
    root = tmp_path / 'cgroup'
    if version == 'v2':
        (root / 'kubepods' / 'pod1').mkdir(parents=True)
        (root / 'kubepods' / 'cpu.max').write_text('1600000 100000\n')  # 16 CPUs
        (root / 'kubepods' / 'pod1' / 'cpu.max').write_text('650000 100000\n')
        (tmp_path / 'self').write_text('0::/kubepods/pod1\n')
        none = 'max 100000\n'
    else:
        (root / 'cpu,cpuacct' / 'docker' / 'abc').mkdir(parents=True)
        for folder, quota in [(root / 'cpu,cpuacct' / 'docker', '-1'),
                              (root / 'cpu,cpuacct' / 'docker' / 'abc', '650000')]:
            (folder / 'cpu.cfs_quota_us').write_text(quota + '\n')
            (folder / 'cpu.cfs_period_us').write_text('100000\n')
        (tmp_path / 'self').write_text('4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n')
        none = None
    quota = cores.cpu_quota(tmp_path / 'self', root)
    assert quota.cpus == 6.5 and quota.cores == 6
    assert quota.cgroup == (root / ('kubepods/pod1' if version == 'v2' else
                                    'cpu,cpuacct/docker/abc')).stat().st_ino  # who shares it
    if version == 'v1':  # mounted under another name than /proc's ('cpu'); a line cut short
        (root / 'cpu,cpuacct').rename(root / 'cpu')
        (tmp_path / 'self').write_text('garbled\n3:cpu,cpuacct:/docker/abc\n')
        assert cores.cpu_quota(tmp_path / 'self', root).cpus == 6.5
        (root / 'cpu').rename(root / 'cpu,cpuacct')
    monkeypatch.setattr(cores, 'affinity', lambda: set(range(64)))
    monkeypatch.setattr(cores, 'cpu_quota', lambda: cores.Quota(6.5, 1))
    assert cores.usable_cores() == 6
    monkeypatch.setattr(cores, 'cpu_quota', lambda: cores.Quota(0.5, 1))
    assert cores.usable_cores() == 1
    monkeypatch.undo()
    if none:
        (root / 'kubepods' / 'pod1' / 'cpu.max').write_text(none)
        (root / 'kubepods' / 'cpu.max').write_text(none)
    else:
        (root / 'cpu,cpuacct' / 'docker' / 'abc' / 'cpu.cfs_quota_us').write_text('-1\n')
    assert cores.cpu_quota(tmp_path / 'self', root) is None


def test_num_workers_auto_divides_only_the_cores_a_process_shares():
    """Ranks bound to cores of their own (torchrun --numa-binding, numactl) each keep theirs:
    8 cores each gave 8 // 2 - 1 = 3 threads (the node's 2 processes assumed to share them), now
    7; ranks that share all 16 cores or overlap still divide them. A CPU quota is divided among
    the ranks under it: one container's among both, a container's each by its rank alone."""
    from conftest import free_port, run_env
    port = free_port()
    env = dict(run_env(), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2', MASTER_ADDR='localhost',
               MASTER_PORT=str(port), TORCHELASTIC_RUN_ID='none')  # as torchrun starts them
    ranks = [subprocess.Popen([sys.executable, '-c', TWO_RANKS_ON_16_CORES], cwd=REPO,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    outputs = [''.join(line for line in rank.communicate(timeout=120)[0].splitlines(True)
                       if not line.startswith('[Gloo]'))  # gloo's own (torch 2.8-2.10)
               for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    waiting = (f'=> rank 0: process group of 2 ranks (gloo) at localhost:{port}: waiting up to '
               '60 s for every rank to join\n')  # rank 0's, before the store waits
    quota = 'one container 2\na container each 5\nbound, one container 2\n'  # 6 // 2 - 1, 6 - 1
    assert outputs == [waiting + 'shared 7\neach its own 8 7\noverlapping 5\n' + quota,
                       'shared 7\neach its own 8 7\noverlapping 3\n' + quota]
    assert load_config(['--data.train_dataset=a', '--data.val_dataset=b', '--logging.folder=c',
                        '--data.num_workers=3']).data.num_workers == 3


def test_more_processes_than_the_nodes_gpus_are_refused_naming_both(monkeypatch):
    """torchrun --nproc_per_node=8 on a node with 4 GPUs: the process of LOCAL_RANK 5 failed in
    CUDA with 'invalid device ordinal'; it is a LaunchError naming LOCAL_RANK and the GPU count
    (mocked: no GPU here)."""
    import torch
    from imagenet_ffcv import distributed
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    env = {'RANK': '5', 'WORLD_SIZE': '8', 'LOCAL_RANK': '5', 'LOCAL_WORLD_SIZE': '8'}
    with pytest.raises(distributed.LaunchError, match=r'LOCAL_RANK=5, but this node has 4 GPU\(s\) '
                                                      r'visible.*--nproc_per_node=gpu'):
        distributed.from_env(env)
    assert distributed.from_env({**env, 'LOCAL_RANK': '3'}).device == torch.device('cuda:3')


def test_a_world_size_left_in_the_shell_is_refused_not_waited_on():
    """WORLD_SIZE=2 exported in the shell, no torchrun: the process, rank 0 for want of RANK,
    waited dist.timeout_s (5 minutes) for a rank that never came, printing nothing. It is refused at
    once, saying what to unset."""
    from imagenet_ffcv import distributed
    with pytest.raises(distributed.LaunchError,
                       match='WORLD_SIZE=2 is set but RANK is not.*Unset WORLD_SIZE'):
        distributed.from_env({'WORLD_SIZE': '2'})
    assert distributed.from_env({'WORLD_SIZE': '1'}).world_size == 1
    assert distributed.from_env({'WORLD_SIZE': '2', 'RANK': '1'}).rank == 1


def test_ranks_left_in_the_shell_say_so_and_fail_in_one_line(tmp_path):
    """RANK=1 WORLD_SIZE=2 left in the shell: plain ``python train_imagenet.py`` waited without a
    word (rank 1 says nothing while it waits), then failed after dist.timeout_s with the store's
    traceback. Every rank started without torchrun says what it waits for and where its RANK
    comes from, and the timeout is one line."""
    from conftest import free_port, run_env
    env = dict(run_env(), RANK='1', WORLD_SIZE='2', MASTER_ADDR='localhost',
               MASTER_PORT=str(free_port()))
    env.pop('TORCHELASTIC_RUN_ID', None)
    proc = subprocess.run([sys.executable, 'train_imagenet.py', *DATA,
                           f'--logging.folder={tmp_path}', '--dist.timeout_s=3'], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert 'rank 1: process group of 2 ranks (gloo) at localhost:' in proc.stdout
    assert 'not started by torchrun: RANK=1 and WORLD_SIZE=2 come from the environment' in \
        proc.stdout
    assert proc.stderr.count('\n') == 1 and 'rank 1: the process group of 2 ranks at ' \
        'localhost:' in proc.stderr and 'did not form within 3 s' in proc.stderr, proc.stderr


def test_several_srun_tasks_without_torchrun_are_refused_before_any_work(tmp_path, monkeypatch,
                                                                         capsys):
    """``srun --ntasks=8 imagenet-ffcv-train`` (no torchrun) would start 8 whole runs of their own
    into one run folder: each task stops at once with a one-line message saying how to launch
    instead, and writes nothing. One srun task, or tasks that torchrun started (RANK set), run."""
    from imagenet_ffcv import distributed, train
    env = {'SLURM_STEP_NUM_TASKS': '8', 'SLURM_PROCID': '3', 'SLURM_LOCALID': '3'}
    with pytest.raises(distributed.LaunchError, match='srun started 8 tasks.*torchrun'):
        distributed.from_env(env)
    assert distributed.from_env({**env, 'SLURM_STEP_NUM_TASKS': '1'}).world_size == 1
    torchrun = {'RANK': '3', 'WORLD_SIZE': '16', 'LOCAL_RANK': '3', 'LOCAL_WORLD_SIZE': '8'}
    assert distributed.from_env({**env, **torchrun}).rank == 3
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = [*DATA, f'--logging.folder={tmp_path / "runs"}']
    assert train.cli(args) == 1
    message = capsys.readouterr().err
    assert message.count('\n') == 1 and 'SLURM_STEP_NUM_TASKS=8' in message, message
    assert not (tmp_path / 'runs').exists()


def test_a_shipped_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    """--config takes a file that exists, else a shipped config by folder/file, file or stem;
    anything else is an error listing the shipped ones."""
    monkeypatch.chdir(tmp_path)
    shipped = REPO / 'imagenet_ffcv' / 'configs' / 'rn50_configs' / 'rn50_16_epochs.yaml'
    for name in ('rn50_configs/rn50_16_epochs.yaml', 'rn50_16_epochs.yaml', 'rn50_16_epochs'):
        assert config_file(name).resolve() == shipped.resolve()
    assert load_config(['--config', 'rn50_16_epochs', *DATA,
                        '--logging.folder=x']).training.epochs == 16
    mine = tmp_path / 'rn50_configs' / 'rn50_16_epochs.yaml'
    mine.parent.mkdir()
    mine.write_text('training:\n  epochs: 3\n')
    assert config_file('rn50_configs/rn50_16_epochs.yaml') == Path('rn50_configs/rn50_16_epochs.yaml')
    with pytest.raises(FileNotFoundError, match=r'nope\.yaml.*rn18_configs/rn18_16_epochs\.yaml'):
        load_config(['--config', 'nope.yaml'])
    # a mistyped path to one's own copy: an error (the shipped recipe of its name ran instead)
    for typo in ('myconfs/rn50_16_epochs.yaml', str(tmp_path / 'myconfs' / 'rn50_16_epochs.yaml'),
                 './rn50_16_epochs.yaml', 'rn18_configs/rn50_16_epochs.yaml'):
        with pytest.raises(FileNotFoundError) as info:
            config_file(typo)
        assert str(info.value) == (f'--config {typo}: no such file (a shipped config has its '
                                   f'name: rn50_configs/rn50_16_epochs.yaml; give that to use it)')


def test_min_lr_above_the_lr_the_batch_scaling_gives_is_refused_before_training():
    """lr.min_lr is not scaled with the batch: a recipe's lr for a global batch of 4096, run on
    one process of 256 images, uses 1/16 of lr.lr, below a min_lr the config alone allows."""
    args = ['--data.train_dataset=x', '--data.val_dataset=y', '--logging.folder=z',
            '--lr.lr_schedule_type=cosine', '--lr.lr=1.7', '--lr.ref_batch_size=4096',
            '--training.batch_size=256']
    assert config.lr_used(load_config(args + ['--lr.min_lr=0.1']), world_size=16) == 1.7
    assert config.lr_used(load_config(args + ['--lr.min_lr=0.1']), world_size=1) == 1.7 / 16
    with pytest.raises(ConfigError, match=r'lr.min_lr=0.2 is above the LR used, 0.10625'):
        config.lr_used(load_config(args + ['--lr.min_lr=0.2']), world_size=1)
