"""Does the decoder change top-1? The same recipe trained with each ``data.decoder`` and several
seeds, on the shared imagenette betons:

    python benchmarks/decoder_parity.py                      # 3 decoders x 3 seeds, ~1 h on 2 cores
    python benchmarks/decoder_parity.py --seeds 0 --epochs 2 # a quick look

Recipe (``common.resnet18_run_args``): ResNet-18 (BlurPool, label smoothing 0.1, SGD, cyclic LR
peaking at epoch 2), 12 epochs at 96 px, ramping to 128 px over epochs 6-9, batch 64, validation
at 128 px (centre crop 224/256 of the shorter side, flip TTA) after the last epoch. Decoders:
``fused`` (ours: region decode, DCT scaling, bilinear), ``fused_aa`` (ours, 2 x 2 samples for
shrinks in (1, 2) too) and ``ffcv`` (ffcv's stock RandomResizedCropRGBImageDecoder: whole decode,
INTER_AREA), each for training and validation.

Each run is an ``imagenet-ffcv-train`` process of its own. Writes one row per run to
bench-results/decoder_parity.csv (``decoder, seed, top_1, top_5, img_per_s, wall_time_s, ...``) and
prints the per-decoder mean, standard deviation and standard error, and each decoder's difference
from ``ffcv`` against twice the standard error of that difference (the noise).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (REPO, RESULTS, SHARED_DATA, machine_line, markdown_table, resnet18_run_args,
                    write_csv)
from imagenet_ffcv.constants import DECODERS


def write_betons(work: Path) -> dict:
    """imagenette's train and val splits as .beton files (imagenet-ffcv-write's defaults: shorter
    side 256 (imagenette is 224 x 224, kept), JPEG q90), written once into ``work``."""
    paths = {}
    for split in ('train', 'val'):
        out = work / f'imagenette_{split}.beton'
        if not out.exists():
            subprocess.run([sys.executable, '-m', 'imagenet_ffcv.write', '--data-dir',
                            str(SHARED_DATA / 'imagenette'), '--split', split, '--out', str(out)],
                           cwd=REPO, check=True)
        paths[split] = out
    return paths


def run_args(betons, folder, *, decoder, seed, epochs, workers) -> list:
    """The command line of one run: the recipe with ``decoder`` and ``seed``."""
    return [sys.executable, '-m', 'imagenet_ffcv.train',
            *resnet18_run_args(train=betons['train'], val=betons['val'], folder=folder,
                               epochs=epochs, batch_size=64, res=(96, 128), val_res=128,
                               val_batch_size=100, lr_per_256=0.2, workers=workers),
            f'--data.decoder={decoder}', f'--training.seed={seed}', '--logging.log_level=0']


def one_run(betons, work, *, decoder, seed, epochs, workers) -> dict:
    """Train one run in its own process; its row from the run's log and results."""
    folder = work / 'runs' / f'{decoder}-seed{seed}'
    started = time.perf_counter()
    proc = subprocess.run(run_args(betons, folder, decoder=decoder, seed=seed, epochs=epochs,
                                   workers=workers),
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'{decoder} seed {seed} failed:\n{proc.stderr[-3000:]}')
    [run_dir] = sorted(folder.iterdir())
    log = [json.loads(line) for line in (run_dir / 'log.jsonl').read_text().splitlines()]
    images = sum(r['train_img_per_s'] * r['epoch_time_s'] for r in log)
    return {'decoder': decoder, 'seed': seed, 'epochs': epochs, 'top_1': log[-1]['top_1'],
            'top_5': log[-1]['top_5'], 'train_loss': round(log[-1]['train_loss'], 4),
            'img_per_s': round(images / sum(r['epoch_time_s'] for r in log), 1),
            'wall_time_s': round(time.perf_counter() - started, 1), 'workers': workers}


def summary_rows(rows: list) -> list:
    """Per decoder: mean, standard deviation and standard error of top-1; the difference of its
    mean from ffcv's and twice the standard error of that difference."""
    by = {d: [r['top_1'] for r in rows if r['decoder'] == d] for d in DECODERS}
    stats = {}
    for d, values in by.items():
        if values:
            sd = statistics.stdev(values) if len(values) > 1 else float('nan')
            stats[d] = {'decoder': d, 'runs': len(values), 'mean_top_1': statistics.mean(values),
                        'sd': sd, 'se': sd / len(values) ** 0.5,
                        'img_per_s': statistics.mean(r['img_per_s'] for r in rows
                                                     if r['decoder'] == d)}
    ref = stats.get('ffcv')
    for s in stats.values():
        if ref and s is not ref:
            s['diff_vs_ffcv'] = s['mean_top_1'] - ref['mean_top_1']
            s['two_se_of_diff'] = 2 * (s['se'] ** 2 + ref['se'] ** 2) ** 0.5
            s['within_noise'] = abs(s['diff_vs_ffcv']) < s['two_se_of_diff']
    return list(stats.values())


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--decoders', default=','.join(DECODERS))
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--work', default='/tmp/decoder_parity', help='betons and run folders')
    p.add_argument('--out', default=str(RESULTS))
    args = p.parse_args()
    if not (SHARED_DATA / 'imagenette' / 'train').is_dir():
        sys.exit(f'decoder_parity.py: needs {SHARED_DATA / "imagenette"} (the shared data)')
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    betons = write_betons(work)
    print(machine_line(), flush=True)
    out = Path(args.out) / 'decoder_parity.csv'
    rows = list(csv.DictReader(open(out))) if out.exists() else []
    rows = [{**r, 'seed': int(r['seed']), 'top_1': float(r['top_1']),
             'img_per_s': float(r['img_per_s'])} for r in rows
            if int(r['epochs']) == args.epochs]  # runs of this recipe kept, others dropped
    done = {(r['decoder'], r['seed']) for r in rows}
    for seed in map(int, args.seeds.split(',')):  # seeds outermost: every decoder gets seed 0 first
        for decoder in args.decoders.split(','):
            if (decoder, seed) in done:
                continue
            row = one_run(betons, work, decoder=decoder, seed=seed, epochs=args.epochs,
                          workers=args.workers)
            rows.append(row)
            write_csv(out, rows)  # after every run: an interrupted study keeps what it measured
            print(f'{decoder} seed {seed}: top-1 {row["top_1"]:.4f}, {row["img_per_s"]:.0f} '
                  f'img/s, {row["wall_time_s"]:.0f} s', flush=True)
    print(f'\n### Decoder parity: ResNet-18, imagenette, {args.epochs} epochs 96 -> 128 px '
          f'({time.strftime("%Y-%m-%d")})\n')
    print(markdown_table(summary_rows(rows), [
        ('decoder', 'decoder', ''), ('runs', 'runs', 'd'), ('mean_top_1', 'mean top-1', '.4f'),
        ('sd', 'sd', '.4f'), ('se', 'se', '.4f'), ('diff_vs_ffcv', 'diff vs ffcv', '+.4f'),
        ('two_se_of_diff', '2 se of diff', '.4f'), ('within_noise', 'within noise', ''),
        ('img_per_s', 'train img/s', ',.0f')]))
    print(f'\nwrote {out}')


if __name__ == '__main__':
    main()
