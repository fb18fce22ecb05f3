"""The short run of conftest.py (its log and params.json) and using its weights: torchvision,
--training.eval_only, predict.py, the parameter/GMAC count and the run's plot. (Every test of the
short run is in this file, so that the two pytest processes of make test do not both train it.)"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from conftest import REPO, SAMPLE, run_env, small_args, small_config
from imagenet_ffcv import (engine, errors, holdout, loaders, metrics, models, predict, sources,
                           train, verify, weights, write)
from imagenet_ffcv.classes import (class_list_path, ilsvrc_classes, read_class_list,
                                   read_class_names, write_class_list)


def eval_config(sample_betons, tmp_path, weights, *extra):
    """Eval-only of ``weights`` on the sample's val .beton, with no training .beton (none is read)."""
    return small_config(sample_betons, tmp_path, '--training.eval_only=1',
                        f'--model.weights={weights}', '--data.train_dataset=', *extra)


def test_short_run_learns_and_logs(short_run):
    summary, cfg = short_run
    run_dir = summary['run_dir']
    log = [json.loads(line) for line in open(f'{run_dir}/log.jsonl')]
    assert [r['epoch'] for r in log] == list(range(6))
    for key in ('train_loss', 'top_1', 'top_5', 'val_loss', 'lr', 'res', 'epoch_time_s',
                'train_img_per_s'):
        assert all(r[key] is not None for r in log), key
    assert log[-1]['train_loss'] < log[0]['train_loss'] - 0.1  # the loss goes down
    assert [r['res'] for r in log] == [32, 32, 32, 32, 64, 64]  # 48 rounds to 64 (multiple of 32)
    assert all(r['val_count'] == 100 for r in log)
    assert log[-1]['lr'] < log[1]['lr']  # cyclic: decaying towards 0 after the peak
    params = json.load(open(f'{run_dir}/params.json'))
    assert params['training']['epochs'] == 6 and params['model']['arch'] == 'resnet18'
    assert params['derived']['lr_used'] == pytest.approx(0.05 * 32 / 64)  # linear scaling
    assert params['derived']['amp'] == 'fp32'  # training.amp=auto on CPU
    assert set(params['code']) == {'version', 'git_commit', 'git_dirty'}  # the run's code
    assert summary['top_1'] == log[-1]['top_1']


def test_saved_weights_load_into_torchvision_and_give_logged_top1(short_run, sample_betons):
    summary, cfg = short_run
    state = torch.load(f'{summary["run_dir"]}/final_weights.pt', weights_only=True)
    assert not any(k.startswith('module.') for k in state)
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(state)  # strict: same keys as the plain torchvision model
    models.apply_blurpool(model)  # the run trained with BlurPool
    model = model.to(memory_format=torch.channels_last)
    val = loaders.val_loader(path=sample_betons['val'], batch_size=64, num_workers=2, res=32,
                          device=torch.device('cpu'))
    result = engine.evaluate(model=model, loader=val, flip_tta=True)
    assert result['count'] == 100
    assert result['top_1'] == summary['top_1']


@pytest.mark.parametrize('name', ['final_weights.pt', 'checkpoint.pt', 'final_weights.safetensors',
                                  ''])  # '': the run folder
def test_eval_only_gives_the_logged_top1_and_top5(short_run, sample_betons, tmp_path, name):
    """Without logging.folder eval-only writes nothing but, with validation.results_file, its
    results as JSON (the table alone was printed: nothing a script of many evaluations could
    read)."""
    summary, cfg = short_run
    weights = Path(summary['run_dir']) / name
    results_file = tmp_path / 'eval.json'
    result = train.main(eval_config(sample_betons, tmp_path, weights, '--logging.folder=', *(
        [f'--validation.results_file={results_file}'] if name == 'checkpoint.pt' else [])))
    assert result['val_count'] == 100
    assert (result['top_1'], result['top_5']) == (summary['top_1'], summary['top_5'])
    assert result['val_loss'] == pytest.approx(summary['val_loss'], rel=1e-6)
    if name == 'checkpoint.pt':  # the summary less its training figures
        assert json.loads(results_file.read_text()) == {
            k: v for k, v in result.items() if k not in ('epochs', 'train_img_per_s')}
        assert result['weights'] == str(weights)
        assert result['val_dataset'] == str(sample_betons['val'])
        results_file.unlink()
    assert list(tmp_path.iterdir()) == []  # evaluation writes no run folder


def test_a_test_set_of_the_runs_classes_is_labelled_by_its_class_list_and_evaluated(
        short_run, sample_betons, tmp_path, capsys):
    """ImageNet-V2 unpacks as folders 0 .. 999 (ILSVRC-2012's class indices), ImageNet-R and -A as
    200 of its wnids' folders, with no train/ to take a class list from: the converter refused
    them, and eval-only refused a run's weights on a .beton of some of their classes. With
    --classes, the sample's val split laid out as ImageNet-V2 lays out its classes (folders
    named by ILSVRC-2012's index) gives the run's top-1 exactly; three of its classes (one folder
    named by its wnid) are evaluated on their logits alone."""
    summary, _ = short_run
    run_dir = Path(summary['run_dir'])
    classes = read_class_list(run_dir / 'classes.tsv')
    ilsvrc = [wnid for wnid, _ in ilsvrc_classes()]
    test_set = tmp_path / 'v2'
    for wnid in classes:
        shutil.copytree(SAMPLE / 'val' / wnid, test_set / str(ilsvrc.index(wnid)))

    def convert(name):
        out = tmp_path / name
        assert write.cli(['--data-dir', str(test_set), '--split', 'val', '--max-res', '64',
                          '--out', str(out), '--classes', str(run_dir / 'classes.tsv')]) == 0
        return out, train.main(eval_config(sample_betons, tmp_path, run_dir / 'final_weights.pt',
                                           f'--data.val_dataset={out}', '--logging.folder='))
    out, result = convert('v2.beton')
    assert read_class_list(class_list_path(out)) == classes
    assert (result['val_count'], result['top_1'], result['top_5']) == (
        100, summary['top_1'], summary['top_5'])
    for wnid in classes[3:]:
        shutil.rmtree(test_set / str(ilsvrc.index(wnid)))
    (test_set / str(ilsvrc.index(classes[1]))).rename(test_set / classes[1])
    capsys.readouterr()
    out, result = convert('some.beton')
    assert read_class_list(class_list_path(out)) == classes[:3]
    assert result['val_count'] == 30
    printed = capsys.readouterr().out
    assert (f'=> 7 of the 10 classes of {run_dir / "classes.tsv"} have no folder in {test_set}: '
            f'the .beton\'s class list holds the other 3') in printed
    assert (f'was trained on 10 classes, of which the 3 of {out} are evaluated (their logits '
            f'alone') in printed


def test_a_results_file_that_cannot_be_written_is_refused_before_any_work(sample_betons,
                                                                          tmp_path):
    """validation.results_file must be a .json file in a folder that exists: a typo learnt of
    after the whole val set was evaluated would cost the evaluation. A run folder's own
    results.json (the obvious place for an evaluation of its weights) would lose the run's."""
    weights = tmp_path / 'not_read.pt'  # refused before the weights are read
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'params.json').write_text('{}')
    for results_file, error in [
            (tmp_path / 'eval.txt', 'give the path of a .json file to write'),
            (tmp_path, 'give the path of a .json file to write'),
            (tmp_path / 'nowhere' / 'eval.json',
             f'the folder {tmp_path / "nowhere"} does not exist; create it first'),
            (run / 'results.json', f'that is the results file of the run {run}; give another '
                                   f'name, such as {run / "eval.json"}')]:
        with pytest.raises(errors.InputError) as e:
            train.main(eval_config(sample_betons, tmp_path, weights,
                                   f'--validation.results_file={results_file}'))
        assert str(e.value) == f'validation.results_file={results_file}: {error}'
    assert sorted(p.name for p in tmp_path.rglob('*')) == ['params.json', 'run']


def test_eval_only_validates_as_the_run_did_but_for_the_command_lines_keys(short_run,
                                                                           sample_betons,
                                                                           tmp_path, capsys):
    """Eval-only took its validation settings from the config files given (here 48 px without
    flip TTA, the run validated at 32 px with it; the README's recipe says 256 px), so its top-1
    was not the one the run logged. It validates as the run did, saying so; a key given on the
    command line still wins, with a note naming the run's value."""
    from imagenet_ffcv import config
    summary, _ = short_run
    weights = Path(summary['run_dir']) / 'final_weights.pt'
    other = tmp_path / 'other.yaml'
    other.write_text('validation:\n  resolution: 48\n  lr_tta: 0\n')
    argv = ['--config', str(other), *(a for a in small_args(
        sample_betons, tmp_path, '--training.eval_only=1', f'--model.weights={weights}',
        '--data.train_dataset=') if not a.startswith('--validation.resolution='))]
    given = config.command_line_keys(argv)
    assert {'model.weights', 'data.val_dataset'} <= given and 'validation.resolution' not in given
    capsys.readouterr()
    result = train.main(config.load_config(argv), given)
    assert (result['val_res'], result['flip_tta']) == (32, True)
    assert (result['top_1'], result['top_5']) == (summary['top_1'], summary['top_5'])
    out = capsys.readouterr().out
    assert (f'=> validating as the run of {weights} did: validation.resolution=32 '
            'validation.lr_tta=1 (its config;') in out
    assert 'note' not in out

    argv.append('--validation.resolution=48')
    result = train.main(config.load_config(argv), config.command_line_keys(argv))
    assert (result['val_res'], result['flip_tta']) == (48, True)
    assert (f'=> note: the run of {weights} validated with validation.resolution=32; this '
            "evaluates with the command line's values\n") in capsys.readouterr().out


def test_eval_only_names_missing_or_unfitting_weights(short_run, sample_betons, tmp_path):
    from imagenet_ffcv import checkpoint, config
    with pytest.raises(checkpoint.CheckpointError, match='nope.pt: no such weights file'):
        train.main(eval_config(sample_betons, tmp_path, tmp_path / 'nope.pt'))
    with pytest.raises(config.ConfigError, match='needs model.weights'):
        small_config(sample_betons, tmp_path, '--training.eval_only=1')
    other = tmp_path / 'resnet34.pt'
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), other)
    with pytest.raises(checkpoint.CheckpointError, match='do not fit resnet18 with 10 classes'):
        train.main(eval_config(sample_betons, tmp_path, other))


def test_eval_only_refuses_weights_trained_on_other_classes(short_run, sample_betons, tmp_path):
    """A val .beton of as many classes, but others (here: the same wnids rotated by one), is
    refused naming both files, instead of giving chance top-1."""
    from imagenet_ffcv.checkpoint import CheckpointError
    summary, cfg = short_run
    val = tmp_path / 'other_val.beton'
    shutil.copy(sample_betons['val'], val)
    wnids = read_class_list(class_list_path(sample_betons['val']))
    write_class_list(class_list_path(val), wnids[1:] + wnids[:1])
    betons = {'train': sample_betons['train'], 'val': val}
    for name in ('final_weights.pt', 'checkpoint.pt', 'final_weights.safetensors'):
        weights = Path(summary['run_dir']) / name
        with pytest.raises(CheckpointError, match=f'{name} was trained on other classes than '
                                                  f'.*other_val.beton has .*other_val.classes.tsv'):
            train.main(eval_config(betons, tmp_path / 'runs', weights))


def test_weights_without_a_config_say_which_model_was_assumed(short_run, sample_betons, tmp_path,
                                                             capsys):
    """BlurPool's filter is not in the state dict, so weights load with it on or off alike: without
    a saved config (a plain state dict), eval-only and predict print the arch and BlurPool
    setting they assumed, and eval-only validates them as predict does (224 px centre crops, as
    torchvision's references: it took the config's resolution, so the two disagreed); BlurPool
    given on eval-only's command line is taken (it was ignored, with no option to turn it on).
    The run's final_weights.pt copied alone carries its config: it evaluates as the run did (it
    was rebuilt as the arch and BlurPool setting assumed)."""
    summary, cfg = short_run
    lone = tmp_path / 'lone' / 'final_weights.pt'
    lone.parent.mkdir()
    shutil.copy(Path(summary['run_dir']) / 'final_weights.pt', lone)
    result = train.main(eval_config(sample_betons, tmp_path / 'runs', lone))
    assert 'note' not in capsys.readouterr().out and result['top_1'] == summary['top_1']
    plain = lone.with_name('plain.pt')
    torch.save(dict(torch.load(lone, weights_only=True)), plain)  # a state dict, nothing more
    note = f'note: no config saved with {plain}: built as resnet18 with BlurPool '
    train.main(eval_config(sample_betons, tmp_path / 'runs', plain))
    out = capsys.readouterr().out
    assert (note + "off (as weights from elsewhere, torchvision's or timm's, are trained); if it "
            "was trained otherwise, say so (--model.arch, --training.use_blurpool; this tool's own "
            "weights files say how they were built)") in out
    assert f'=> validating {plain} (no config saved with it) as predict and torchvision\'s ' \
           f'references evaluate such weights: validation.resolution=224 (set them' in out
    assert '| centre 224 px + flip |' in out
    train.main(eval_config(sample_betons, tmp_path / 'runs', plain, '--training.use_blurpool=1',
                           '--validation.resolution=64'),
               frozenset({'training.use_blurpool', 'validation.resolution'}))
    out = capsys.readouterr().out
    assert note + 'on; if it was trained otherwise, say so (--model.arch' in out
    assert 'validating' not in out and '| centre 64 px + flip |' in out
    lone = plain
    image = sorted((SAMPLE / 'val').glob('*/*.JPEG'))[0]
    classes = class_list_path(sample_betons['val'])
    predict.predict([image], weights=lone, classes_path=classes, arch='resnet18', blurpool=True)
    err = capsys.readouterr().err
    assert note + 'on; if it was trained otherwise, say so (--arch, --blurpool)' in err
    predict.predict([image], weights=lone, classes_path=classes, arch='resnet18')
    assert note + "off (as weights from elsewhere" in capsys.readouterr().err
    predict.predict([image], weights=Path(summary['run_dir']) / 'final_weights.pt')
    assert 'note' not in capsys.readouterr().err  # the run's params.json says how it was built


def test_overridden_options_and_a_training_beton_evaluated_are_named(short_run, sample_betons,
                                                                    tmp_path, capsys):
    """An arch or BlurPool setting given for weights that carry their run's config is not used
    (the config builds the model): a note says so, in predict and eval-only (they were ignored
    without a word); one that agrees with the config, or none given, says nothing. Eval-only on
    the training .beton says so (it reported top-1 on training images without a word)."""
    summary, cfg = short_run
    run_weights = Path(summary['run_dir']) / 'final_weights.pt'
    image = sorted((SAMPLE / 'val').glob('*/*.JPEG'))[0]
    predict.predict([image], weights=run_weights, arch='resnet50', blurpool=0)
    assert (f"note: --arch=resnet50 --blurpool=0 not used: the config saved with {run_weights} "
            f"builds resnet18 with BlurPool on") in capsys.readouterr().err
    predict.predict([image], weights=run_weights, arch='resnet18', blurpool=1)
    assert 'note' not in capsys.readouterr().err
    train.main(eval_config(sample_betons, tmp_path / 'runs', run_weights,
                           '--training.use_blurpool=0'), frozenset({'training.use_blurpool'}))
    assert (f"note: --training.use_blurpool=0 not used: the config saved with {run_weights} "
            f"builds resnet18 with BlurPool on") in capsys.readouterr().out
    # the training .beton evaluated: a note (training refuses it as the val .beton)
    copy = tmp_path / 'train_copy.beton'
    for source, target in ((sample_betons['train'], copy),
                           (class_list_path(sample_betons['train']), class_list_path(copy))):
        shutil.copy(source, target)
    holdout.write_holdout_record(copy, 'train', 0)
    train.main(eval_config({**sample_betons, 'val': copy}, tmp_path / 'runs', run_weights))
    assert (f'=> note: {copy} was written with --split train: top-1 is measured on training '
            f'images') in capsys.readouterr().out


def test_weights_from_elsewhere_are_rebuilt_without_blurpool_unless_asked(tmp_path):
    """A torchvision state dict (no config, no BlurPool filters) was rebuilt with BlurPool, the
    default of the configs and of predict, and so computed other logits than the model it came
    from: eval-only and predict gave a much lower top-1. It is rebuilt without, giving the
    source model's logits; BlurPool only when asked."""
    source = models.build_model(arch='resnet18', num_classes=10, use_blurpool=False,
                                channels_last=False).eval()
    torch.save(source.state_dict(), tmp_path / 'resnet18.pt')
    x = torch.randn(2, 3, 64, 64)
    rebuilt = weights.load_model(tmp_path / 'resnet18.pt', num_classes=10, arch='resnet18',
                                 channels_last=False)
    assert not any(isinstance(m, models.BlurPoolConv2d) for m in rebuilt.model.modules())
    with torch.no_grad():
        assert torch.equal(rebuilt.model.eval()(x), source(x))
        blurred = weights.load_model(tmp_path / 'resnet18.pt', num_classes=10, arch='resnet18',
                                     use_blurpool=True, channels_last=False).model.eval()
        assert any(isinstance(m, models.BlurPoolConv2d) for m in blurred.modules())
        assert not torch.allclose(blurred(x), source(x), atol=1e-3)


def test_model_complexity_counts_resnet50_as_torchvision_lists_it():
    meta = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta
    size = metrics.model_complexity(torchvision.models.resnet50(), 224)
    assert size['params_m'] * 1e6 == meta['num_params']
    assert size['gmacs'] == pytest.approx(meta['_ops'], rel=1e-3)  # 4.089 GMACs
    # Cost grows with the square of the side; BlurPool adds its blur convolutions.
    assert metrics.model_complexity(torchvision.models.resnet50(), 448)['gmacs'] == \
        pytest.approx(4 * size['gmacs'], rel=0.01)


def test_results_table_and_plot_of_the_run(short_run):
    summary, cfg = short_run
    assert summary['params_m'] == pytest.approx(11.18, abs=0.01)  # resnet18, 10 classes
    assert 0 < summary['gmacs'] < 0.1  # 32 px images
    table = metrics.results_table(summary)
    assert 'params (M)' in table and 'GMACs' in table and '11.18' in table
    with Image.open(Path(summary['run_dir']) / 'progress.png') as png:
        assert png.format == 'PNG' and png.size[0] >= 600


@pytest.mark.slow
def test_predict_prints_named_top5_and_agrees_with_validation(short_run):
    summary, cfg = short_run
    weights = Path(summary['run_dir']) / 'final_weights.pt'
    files = sorted((SAMPLE / 'val').glob('*/*.JPEG'))
    classes = sources.find_classes(SAMPLE / 'train')
    names = dict(read_class_names(Path(summary['run_dir']) / 'classes.tsv'))
    # Stored as the sample betons store them (shorter side 64, q90), the 100 val images give
    # predict exactly the inputs validation had (test_predict_sees_what_validation_sees), in the
    # same batches of 64: the same top-1, to the image (measured: 0 images apart). Predict takes
    # the 64 px from the run (its val .beton's largest shorter side); at 256 px, its default
    # before, it stored them larger than validation saw them (the images are 224 px), and the
    # scores differ.
    params = json.loads((Path(summary['run_dir']) / 'params.json').read_text())
    assert params['derived']['val_image_side'] == 64
    results = predict.predict(files, weights=weights)
    assert results == predict.predict(files, weights=weights, max_res=64)
    assert results != predict.predict(files, weights=weights, max_res=256)
    hits = sum(r[0][0] == f.parent.name for r, f in zip(results, files))
    assert hits == round(summary['top_1'] * len(files))
    for r in results:
        assert len(r) == 5 and [p for *_, p in r] == sorted([p for *_, p in r], reverse=True)
        assert 0 < sum(p for *_, p in r) <= 1 + 1e-6 and r[0][1] == names[r[0][0]]

    proc = subprocess.run([sys.executable, 'predict.py', str(files[0]), str(files[-1]),
                           '--weights', str(weights), '--top', '3'],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == str(files[0]) and lines[4] == str(files[-1]) and len(lines) == 8
    known = set(names.values())
    for line in lines[1:4] + lines[5:8]:
        m = re.fullmatch(r'(.+) \(score = (0\.\d{5}|1\.00000)\)', line)
        assert m and m.group(1) in known, line
    assert names[classes[0]] == 'tench'  # names from the ILSVRC-2012 list
    # a reader that has stopped (predict.py ... | head -n 1, once head has its line): no
    # BrokenPipeError traceback, a bad image after it still named, the status of the predictions
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, 'w') as closed:
        proc = subprocess.run([sys.executable, 'predict.py', str(files[0]), str(REPO / 'nope.jpg'),
                               '--weights', str(weights)], cwd=REPO, env=run_env(), stdout=closed,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 1 and 'Error' not in proc.stderr, proc.stderr[-2000:]
    assert 'nope.jpg: no such file' in proc.stderr


def test_predict_sees_what_validation_sees(sample_betons):
    """For the JPEG bytes of each val .beton record, predict's model input equals the CPU val
    loader's batch row bit for bit; and each original val file, stored as the converter stored it
    (shorter side 64, q90), gives exactly the record's bytes, so predict on the file sees what
    validation saw."""
    import numpy as np
    path = sample_betons['val']
    loader = loaders.val_loader(path=path, batch_size=16, num_workers=2, res=40,
                                device=torch.device('cpu'))
    rows = torch.cat([x.clone() for x, _ in loader])
    data, stored = verify.file_bytes(path), verify.records(path)
    files = [p for p, _ in sources.list_samples(SAMPLE / 'val', sources.find_classes(
        SAMPLE / 'train'))]
    assert len(files) == len(rows) == len(stored)
    for k, m in enumerate(stored):
        record = verify.record_bytes(data, m)
        x = predict.model_input(record, int(m['height']), int(m['width']), res=40)
        assert torch.equal(x, rows[k]), k
        jpeg, height, width = predict.image_record(files[k], max_res=64)
        assert (height, width) == (int(m['height']), int(m['width']))
        assert np.array_equal(jpeg, record), k


def test_predict_resizes_as_the_runs_decoder(sample_betons, tmp_path, monkeypatch, capsys):
    """The model inputs predict builds for weights of a data.decoder=fused_aa run are that run's
    val loader rows bit for bit (antialiased shrinks: not the plain fused decoder's rows); for a
    data.decoder=ffcv run predict says on stderr that it resizes otherwise."""
    from imagenet_ffcv import models, weights
    rows = {}
    for decoder in ('fused', 'fused_aa'):
        loader = loaders.val_loader(path=sample_betons['val'], batch_size=50, num_workers=2,
                                    res=40, device=torch.device('cpu'), decoder_name=decoder)
        rows[decoder] = torch.cat([x.clone() for x, _ in loader])
    assert not torch.equal(rows['fused'], rows['fused_aa'])  # the shrink 56 -> 40 px differs
    classes = read_class_names(class_list_path(sample_betons['val']))
    model = models.build_model(arch='resnet18', num_classes=len(classes), use_blurpool=False,
                               channels_last=False)
    seen = []
    classify = predict.classify
    monkeypatch.setattr(predict, 'classify', lambda model, x, **kw: seen.append(x) or classify(
        model, x, **kw))
    files = [p for p, _ in sources.list_samples(SAMPLE / 'val', sources.find_classes(
        SAMPLE / 'train'))]
    for decoder in ('fused_aa', 'ffcv'):
        run_config = {'model': {'arch': 'resnet18'}, 'data': {'decoder': decoder},
                      'training': {'use_blurpool': 0, 'channels_last': 0},
                      'validation': {'resolution': 40, 'lr_tta': 0}}
        (tmp_path / decoder).mkdir()
        path = weights.save_final_weights(model.state_dict(), tmp_path / decoder / 'final.pt',
                                          config=run_config, classes=classes)
        seen.clear()
        predict.predict(files if decoder == 'fused_aa' else files[:1], weights=path, max_res=64)
        if decoder == 'fused_aa':
            assert torch.equal(torch.cat(seen), rows['fused_aa'])
            assert 'note' not in capsys.readouterr().err
        else:
            assert "validated with ffcv's decoder" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_names_a_bad_image_and_a_missing_class_list(short_run, tmp_path, monkeypatch):
    """A file that is not an image, a folder with no images and a missing file among images: each
    named on stderr as what it is, exit 1, the images' classes printed (nothing was printed
    before: the first bad file ended the command); --top below 1 is refused. An error of PIL's
    that is no OSError or ValueError (its plugins raise SyntaxError, EOFError, ...; and
    DecompressionBombError stopped the command with a traceback) is named the same way."""
    summary, cfg = short_run
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(b'not a jpeg')
    good = [str(p) for p in sorted((SAMPLE / 'val').glob('*/*.JPEG'))[:2]]
    final = Path(summary['run_dir']) / 'final_weights.pt'
    (tmp_path / 'empty').mkdir()
    proc = subprocess.run([sys.executable, 'predict.py', good[0], str(bad), str(tmp_path / 'empty'),
                           str(tmp_path / 'gone.jpg'), good[1], '--weights', str(final)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and f'predict.py: {bad}: cannot decode' in proc.stderr
    assert f'{tmp_path / "empty"}: no image files in this folder or its subfolders' in proc.stderr
    assert f'{tmp_path / "gone.jpg"}: no such file' in proc.stderr
    printed = proc.stdout.splitlines()
    assert [line for line in printed if 'score =' not in line] == good
    assert len(printed) == 2 + 2 * 5
    load_image = predict.load_image

    def pil_failing_on_the_first(path, max_res):
        if path == good[0]:
            raise SyntaxError('broken')  # as PIL's PNG plugin does for a broken file
        return load_image(path, max_res)
    monkeypatch.setattr(predict, 'load_image', pil_failing_on_the_first)
    results = predict.predict([good[0], good[1]], weights=final, max_res=64)
    assert isinstance(results[0], ValueError) and len(results[1]) == 5
    assert str(results[0]) == f'{good[0]}: cannot decode the image (broken)'
    with pytest.raises(SystemExit):
        predict.cli([good[0], '--weights', 'any.pt', '--top', '0'])
    lone = tmp_path / 'final_weights.pt'  # copied alone: its config and classes are inside
    shutil.copy(Path(summary['run_dir']) / 'final_weights.pt', lone)
    assert predict.predict([good[1]], weights=lone) == predict.predict([good[1]], weights=final)
    plain = tmp_path / 'plain.pt'  # a state dict alone: no class list to name its outputs
    torch.save(dict(torch.load(lone, weights_only=True)), plain)
    with pytest.raises(FileNotFoundError, match='--classes'):
        predict.predict([bad], weights=plain)


def test_a_csv_that_is_a_fifo_is_refused_before_any_image_is_read(tmp_path, capsys):
    """--csv a FIFO (or a device) passed the check of the file to write and was refused only by
    the atomic write, after every image had been classified."""
    fifo = tmp_path / 'out.csv'
    os.mkfifo(fifo)
    image = str(sorted((SAMPLE / 'val').glob('*/*.JPEG'))[0])
    assert predict.cli([image, '--weights', 'no-such.pt', '--csv', str(fifo)]) == 1
    assert f'{fifo} is not a regular file (a device, a FIFO or a socket)' in \
        capsys.readouterr().err


def test_predict_refuses_storage_options_out_of_range_before_reading_the_weights(capsys):
    """--max-res 0 was taken as the default, -1 shrank each image to 1 x 1 px, --res 0 as the
    run's resolution, --jpeg-quality 101 as OpenCV's 100: each refused as the converter refuses
    it (exit status 2), before the weights are read."""
    image = str(sorted((SAMPLE / 'val').glob('*/*.JPEG'))[0])
    for option, value, message in (('--max-res', '0', 'must be >= 1'),
                                   ('--max-res', '-1', 'must be >= 1'),
                                   ('--res', '0', 'must be >= 1'),
                                   ('--jpeg-quality', '101', 'must lie in [1, 100]'),
                                   ('--restart-interval', '-2', 'must be >= 0 (0: no markers)'),
                                   ('--top', '0', 'must be >= 1')):
        with pytest.raises(SystemExit) as info:
            predict.cli([image, '--weights', 'no-such.pt', option, value])
        assert info.value.code == 2
        assert f'{option} {value}: {message}' in capsys.readouterr().err


def test_predict_classifies_the_images_of_a_folder_into_a_csv_file(short_run, tmp_path, capsys,
                                                                   monkeypatch):
    """A folder stands for the image files in it and its subfolders (by name; hidden files left
    out, other files and links to images listed already left out and named; a file given again,
    by itself, is classified once, with a warning: it had two rows). --csv writes a row
    per image, with the classes and scores predict() gives; an image that cannot be decoded has
    its error there, the others are classified. A --csv in a folder that does not exist is
    refused before any work (it failed after classifying every image), and so is one that is not a .csv file (``--csv *.jpg`` would
    have replaced the first image by the predictions)."""
    summary, _ = short_run
    weights = summary['run_dir']
    photos = tmp_path / 'photos'
    (photos / 'more').mkdir(parents=True)
    files = sorted((SAMPLE / 'val').glob('*/*.JPEG'))[:3]
    shutil.copy(files[0], photos / 'a.JPEG')
    shutil.copy(files[1], photos / 'more' / 'c.jpg')
    shutil.copy(files[1], photos / '.hidden.jpg')
    (photos / 'broken.jpg').write_bytes(b'not a jpeg')
    (photos / 'notes.txt').write_text('not an image')
    (photos / 'same.jpg').symlink_to('a.JPEG')
    (photos / 'gone.jpg').symlink_to('nowhere.jpg')
    out = tmp_path / 'predictions.csv'
    with pytest.warns(UserWarning) as warned:
        assert predict.cli([str(photos), str(files[2]), str(photos / 'a.JPEG'), '--weights',
                            weights, '--top', '2', '--csv', str(out)]) == 1
    warned = [str(w.message) for w in warned]
    assert warned.pop(1) == (f'1 entry is neither a readable file nor a folder (a broken or '
                             f'looping symbolic link: to a disk not mounted?), so the images it '
                             f'leads to are left out: {photos / "gone.jpg"}')  # as the converter
    assert [message.split(': ')[1].split(';')[0] for message in warned] == [
        str(photos / 'notes.txt'), str(photos / 'same.jpg'), str(photos / 'a.JPEG')]
    assert warned[2].startswith('1 file(s) given more than once, taken once')
    assert warned[0].startswith('1 file whose extension is not one of')
    printed = capsys.readouterr()
    assert printed.out == f'=> 3 image(s) classified, 1 not (their error column says why): {out}\n'
    assert f': {photos / "broken.jpg"}: cannot decode the image' in printed.err
    rows = list(csv.reader(out.open()))
    assert rows[0] == ['path', 'wnid_1', 'name_1', 'score_1', 'wnid_2', 'name_2', 'score_2',
                       'error']
    classified = [photos / 'a.JPEG', photos / 'more' / 'c.jpg', files[2]]
    tops = predict.predict(classified, weights=weights, top=2)
    assert rows[1:2] + rows[3:] == [
        [str(path), *(cell for w, n, p in top for cell in (w, n, f'{p:.6f}')), '']
        for path, top in zip(classified, tops)]
    assert rows[2][:7] == [str(photos / 'broken.jpg')] + [''] * 6
    assert rows[2][7].startswith(f'{photos / "broken.jpg"}: cannot decode the image')
    monkeypatch.setattr(predict, 'predict', None)  # refused before: never called
    assert predict.cli([str(files[0]), '--weights', weights,
                        '--csv', str(tmp_path / 'nowhere' / 'p.csv')]) == 1
    assert capsys.readouterr().err.endswith(f': --csv {tmp_path / "nowhere" / "p.csv"}: the '
                                            f'folder {tmp_path / "nowhere"} does not exist; '
                                            f'create it first\n')
    image = photos / 'a.JPEG'
    assert predict.cli(['--csv', str(image), str(files[0]), '--weights', weights]) == 1
    assert capsys.readouterr().err.endswith(f': --csv {image}: give the path of a .csv file to '
                                            f'write (is it one of the images? --csv takes the '
                                            f'file name first)\n')
    assert image.read_bytes() == files[0].read_bytes()


def test_predict_names_the_1000_outputs_of_imagenet_weights_from_elsewhere(tmp_path, capsys):
    """Torchvision-style ImageNet weights without a class list (as a model zoo gives them): their
    1,000 outputs are named as ILSVRC-2012's classes in sorted-wnid order, with a note; it asked
    for a --classes file the user may not have (and the shipped list is not in that format)."""
    from imagenet_ffcv.classes import wnid_names
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000)
    torch.save(model.state_dict(), tmp_path / 'resnet18-imagenet.pth')
    image = sorted((SAMPLE / 'val').glob('*/*.JPEG'))[0]
    tops = predict.predict([image], weights=tmp_path / 'resnet18-imagenet.pth', arch='resnet18',
                           blurpool=False, top=3)
    wnids, names = sorted(wnid_names()), wnid_names()
    x = predict.model_input(*predict.image_record(image), res=224, antialias=False)
    with torch.no_grad():
        model.eval()
        logits = (model(x[None]) + model(torch.flip(x[None], dims=[3]))) / 2
    assert [w for w, _, _ in tops[0]] == [wnids[i] for i in logits[0].topk(3).indices]
    assert all(name == names[w] for w, name, _ in tops[0])
    assert "named as ILSVRC-2012's classes in their usual order" in capsys.readouterr().err


def test_predict_warns_when_classes_replace_other_saved_classes(short_run, tmp_path, capsys):
    summary, cfg = short_run
    run_list = Path(summary['run_dir']) / 'classes.tsv'
    rotated = read_class_list(run_list)
    write_class_list(tmp_path / 'other.classes.tsv', rotated[1:] + rotated[:1])
    image = sorted((SAMPLE / 'val').glob('*/*.JPEG'))[0]
    weights = Path(summary['run_dir']) / 'final_weights.pt'
    assert predict.cli([str(image), '--weights', str(weights), '--classes', str(run_list)]) == 0
    printed = capsys.readouterr()
    assert 'warning' not in printed.err
    out = printed.out
    # a run folder's list, or a .beton's, as the converter's --classes takes them
    for given in (run_list.parent, cfg.data.val_dataset):
        assert predict.cli([str(image), '--weights', str(weights), '--classes', str(given)]) == 0
        assert capsys.readouterr().out == out
    assert predict.cli([str(image), '--weights', str(weights), '--classes',
                        str(tmp_path / 'other.classes.tsv')]) == 0
    assert (f'warning: {tmp_path / "other.classes.tsv"} names other classes than those saved '
            f'with {weights}') in capsys.readouterr().err


@pytest.mark.parametrize('text, line', [
    ('n01440764 tench, Tinca tinca\nn01443537 goldfish\n', 'n01440764 tench, Tinca tinca'),
    ('0\tn01440764\ttench\n1\n', '1'), ('tench\ngoldfish\n', 'tench')])
def test_a_class_list_in_another_format_is_named_with_its_line(short_run, tmp_path, capsys, text,
                                                               line):
    """--classes synset_words.txt (ILSVRC's 'wnid names' lines), a row without a wnid or a
    one-name-per-line file: the file, the line and the expected format, not a bare int() or
    IndexError."""
    summary, cfg = short_run
    path = tmp_path / 'synset_words.txt'
    path.write_text(text)
    image = sorted((SAMPLE / 'val').glob('*/*.JPEG'))[0]
    weights = Path(summary['run_dir']) / 'final_weights.pt'
    assert predict.cli([str(image), '--weights', str(weights), '--classes', str(path)]) == 1
    n = text.splitlines().index(line) + 1
    assert f'synset_words.txt: line {n} is {line!r}, expected "{n - 1}<TAB>wnid<TAB>name"' in \
        capsys.readouterr().err


def test_an_empty_class_list_or_one_naming_a_class_twice_is_refused_naming_the_file(tmp_path):
    """The converter's --classes took an empty file as a list of no classes (every folder then
    'not a class of the list') and a wnid listed twice without a word (two labels of one class)."""
    from imagenet_ffcv.classes import ClassListError, class_list_of
    empty, twice = tmp_path / 'empty.tsv', tmp_path / 'twice.tsv'
    empty.write_text('\n')
    twice.write_text('0\tn01440764\ttench\n1\tn01443537\tgoldfish\n2\tn01440764\ttench\n')
    with pytest.raises(ClassListError, match=f'^{empty}: holds no class \\(empty\\)'):
        class_list_of(str(empty))
    with pytest.raises(ClassListError, match=f'^{twice}: line 3 names n01440764 again \\(line 1\\):'
                                             ' two labels of one class'):
        class_list_of(str(twice))


class FlipSensitive(torch.nn.Module):
    """Logits [2, 6 s, 0] where s = +1 for an image bright on its left half, -1 for its flip. The
    mean of the two logits picks class 0; the mean of the two softmaxes would pick class 1
    (0.449 against 0.490)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(6.0))

    def forward(self, x):
        half = x.shape[-1] // 2
        s = x[..., :half].mean(dim=(1, 2, 3)) - x[..., half:].mean(dim=(1, 2, 3))
        return torch.stack([torch.full_like(s, 2.0), self.scale * s, torch.zeros_like(s)], dim=1)


def test_predict_and_eval_only_share_the_flip_tta_rule():
    """predict.py's top-1 is the class validation counts as the prediction for the same image, even
    where averaging probabilities (predict's old rule) would pick another class."""
    model = FlipSensitive().eval()
    x = torch.zeros(1, 3, 8, 8)
    x[..., :4] = 1.0
    logits, flipped = model(x), model(torch.flip(x, dims=[3]))
    by_probs = (logits.softmax(1) + flipped.softmax(1)).argmax(1).item()
    by_logits = (logits + flipped).argmax(1).item()
    assert (by_probs, by_logits) == (1, 0)  # the two rules disagree on this image
    classes = [('n0', 'zero'), ('n1', 'one'), ('n2', 'two')]
    [top] = predict.classify(model, x, classes=classes, top=3, flip_tta=True)
    assert top[0][:2] == ('n0', 'zero')
    for label, hit in ((0, 1.0), (1, 0.0)):
        result = engine.evaluate(model=model, loader=[(x, torch.tensor([label]))], flip_tta=True)
        assert result['top_1'] == hit
    # Without flip TTA both take the plain logits: class 1.
    assert predict.classify(model, x, classes=classes, top=1, flip_tta=False)[0][0][0] == 'n1'


def test_a_weights_file_that_would_run_code_is_refused_by_predict_eval_and_resume(
        sample_betons, tmp_path, capsys):
    from test_checkpoint import hostile_file
    from imagenet_ffcv import checkpoint
    path, marker = hostile_file(tmp_path, 'checkpoint.pt')
    image = sorted((SAMPLE / 'val').glob('*/*.JPEG'))[0]
    assert predict.cli([str(image), '--weights', str(path)]) == 1
    assert 'checkpoint.pt: refused' in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match='checkpoint.pt: refused'):
        train.main(eval_config(sample_betons, tmp_path / 'runs', path))
    with pytest.raises(checkpoint.CheckpointError, match='checkpoint.pt: refused'):
        train.main(small_config(sample_betons, tmp_path / 'runs', f'--resume={path}'))
    assert not marker.exists()
