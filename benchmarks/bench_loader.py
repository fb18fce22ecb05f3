"""Loader throughput, side by side on the same images, cores and batch size, after a warm-up:

1. our training pipeline (``loaders.train_loader``: random-resized crop + flip + normalise, float32
   NCHW tensors as the trainer gets them) against ffcv 1.0.2's stock decoder and ops, against
   torchvision's reference pipeline (``ImageFolder`` + ``RandomResizedCrop``,
   ``RandomHorizontalFlip``, ``PILToTensor``, ``ConvertImageDtype``, ``Normalize`` in a
   ``DataLoader`` with as many workers) reading the original JPEGs, and against NVIDIA DALI's CPU
   pipeline (``dali``, ``dali_antialias``: file reader + ROI random-crop decode + resize +
   crop_mirror_normalize, reading the JPEG records the beton holds written out as files; on the
   main set only), at 160, 192 and 224 px;
2. the limit: bare libjpeg-turbo decode of the same stored JPEGs, one thread, times the cores;
3. ablations on the main set at 160 px: write mode, --max-res, JPEG quality, restart markers,
   traversal order, os_cache, loader threads, batch 128: img/s, bytes on disk per image, peak RSS.

    python benchmarks/bench_loader.py    # make bench runs it; 6-7 minutes on 2 cores with DALI

Data: ../shared/data/imagewoof320 (the main set: real aspect ratios) and imagenette, each pooled
(train + val) and repeated to at least --min-samples images; the embedded demo sample when
../shared is absent. DALI (``nvidia-dali-cuda130==2.4.0``, which ``make bench`` installs) is
optional: without it its rows are skipped with one line (``--peers`` picks the loaders measured
beside ours). Prints Markdown tables; writes bench-results/loader.csv and loader.png.
"""
import argparse
import functools
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import (RESULTS, STORAGE, PeakRSS, epoch_of, ffcv_stock_loader, image_sets,
                    machine_line, markdown_table, our_loader, pooled_samples, stored_beton,
                    stored_jpegs, time_epochs, write_csv)
from imagenet_ffcv import verify
from imagenet_ffcv.constants import IMAGENET_MEAN, IMAGENET_STD

DALI_PIN = 'nvidia-dali-cuda130==2.4.0'  # the Makefile's bench target installs this one
PEERS = ('ffcv_stock', 'torchvision', 'dali')  # measured beside ours; dali = dali + dali_antialias
ORDER = {'ffcv': 0, 'ffcv_stock': 1, 'dali': 2, 'dali_antialias': 3, 'torchvision': 4,
         'decode_limit': 5}  # row order of the printed table
FFCV_LOADERS = {'ffcv': our_loader, 'ffcv_stock': ffcv_stock_loader}


def torchvision_loader(root, n_images, *, res, workers, batch_size):
    """torchvision's reference classification pipeline on the original JPEGs (train + val
    ImageFolders, repeated to ``n_images``), workers kept between epochs."""
    from torch.utils.data import ConcatDataset, DataLoader, Subset
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder
    transform = T.Compose([T.RandomResizedCrop(res), T.RandomHorizontalFlip(), T.PILToTensor(),
                           T.ConvertImageDtype(torch.float),
                           T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    folders = ConcatDataset([ImageFolder(Path(root) / s, transform=transform)
                             for s in ('train', 'val') if (Path(root) / s).is_dir()])
    indices = [i % len(folders) for i in range(n_images)]
    return DataLoader(Subset(folders, indices), batch_size=batch_size, shuffle=True,
                      num_workers=workers, drop_last=True, persistent_workers=True)


def dali_missing():
    """None when DALI can be imported, else the line that says its rows are skipped."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return (f'DALI ({DALI_PIN.replace("==", " ")}) not installed: its rows are skipped; '
                f'make bench installs it')
    return None


def dali_files(beton, folder) -> Path:
    """The beton's JPEG records (the exact bytes our loader decodes) as ``label/index.jpg`` files
    under ``folder``, the layout DALI's file reader takes (labels = sorted folder order)."""
    data = verify.file_bytes(beton)
    folder = Path(folder)
    for i, record in enumerate(verify.records(beton)):
        assert record['mode'] == verify.JPEG_MODE, 'DALI rows need JPEG storage'
        label = folder / f'{int(record["label"]):05d}'
        label.mkdir(parents=True, exist_ok=True)
        verify.record_bytes(data, record).tofile(label / f'{i:07d}.jpg')
    return folder


def dali_loader(files, *, res, workers, batch_size, antialias):
    """NVIDIA DALI's CPU pipeline as a user would write it for ImageNet training without a GPU
    (``device_id=None``): file reader (shuffled) -> ROI random-crop decode (area [0.08, 1], ratio
    [3/4, 4/3], as torchvision's) -> bilinear resize to res x res (with or without DALI's
    antialias) -> random mirror + normalise to float32 CHW, iterated by the PyTorch plugin's
    ``DALIGenericIterator`` into CPU torch tensors ({'data': (B, 3, res, res), 'label': (B, 1)});
    the last partial batch is dropped, as ours."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    @pipeline_def(batch_size=batch_size, num_threads=workers, device_id=None, seed=0)
    def pipeline():
        jpegs, labels = fn.readers.file(file_root=str(files), random_shuffle=True, name='reader')
        images = fn.decoders.image_random_crop(jpegs, device='cpu', output_type=types.RGB,
                                               random_area=[0.08, 1.0],
                                               random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, resize_x=res, resize_y=res, interp_type=types.INTERP_LINEAR,
                           antialias=antialias)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout='CHW',
                                          mean=IMAGENET_MEAN.tolist(),  # already x 255
                                          std=IMAGENET_STD.tolist(),
                                          mirror=fn.random.coin_flip())
        return images, labels

    return DALIGenericIterator([pipeline()], ['data', 'label'], reader_name='reader',
                               last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)


def dali_epoch(loader):
    def run():
        n = 0
        for (batch,) in loader:
            n += len(batch['label'])
        return n
    return run


def stored_bytes_per_image(path) -> float:
    """Mean bytes of the stored image records (the file itself also holds ffcv's preallocated
    pages, which dominate the size of a small file)."""
    return float(np.mean(verify.records(path)['size']))


def decode_limit(path, runs: int) -> dict:
    """Bare decode of every stored JPEG with libjpeg-turbo (ffcv's ``imdecode``: TurboJPEG, fast
    IDCT), one thread, median of ``runs`` passes after one warm-up pass; img/s x cores."""
    from ffcv.libffcv import imdecode
    images = stored_jpegs(path)
    buf = np.empty(max(h * w * 3 for _, h, w in images), np.uint8)

    def run():
        for blob, h, w in images:
            imdecode(blob, buf, h, w, h, w, 0, 0, 1, 1, False, False)
        return len(images)
    single = time_epochs(run, runs)
    return {'img_per_s': round(single['img_per_s'] * os.cpu_count(), 1),
            'spread': round(single['spread'] * os.cpu_count(), 1),
            'single_thread_img_per_s': single['img_per_s']}


def measure(make, res_list, runs) -> list:
    """img/s of a loader made by ``make()`` (returns ``(loader, decoder)``) at each resolution;
    the decoder's ``output_size`` changes between them, as in the trainer."""
    loader, decoder = make()
    results = []
    for res in res_list:
        decoder.output_size = (res, res)
        results.append({'res': res, **time_epochs(epoch_of(loader), runs)})
    del loader, decoder
    gc.collect()
    return results


def main(argv=None):
    args = parse_args(argv)
    res_list, peers = args.res_list, args.peer_list
    sets = image_sets(args.sets.split(','))
    started = time.perf_counter()
    print(machine_line())
    if 'dali' in peers and not dali_available():
        peers.remove('dali')
    rows = []
    with tempfile.TemporaryDirectory(prefix='bench_loader_') as tmp:
        for name, root in sets.items():
            folder = Path(tmp) / name
            folder.mkdir()
            rows += measure_set(name, root, folder, args, peers,
                                main_set=name == next(iter(sets)))
            print(f'  measured in {time.perf_counter() - started:.0f} s so far', flush=True)
        if not args.no_ablations:
            name, root = next(iter(sets.items()))
            rows += ablations(name, root, Path(tmp) / name, args, res_list[0])
    add_ratios(rows)
    out = Path(args.out)
    write_csv(out / 'loader.csv', rows)
    print_tables(rows, res_list)
    plot(rows, out / 'loader.png')
    print(f'\nwrote {out / "loader.csv"} and {out / "loader.png"} in '
          f'{time.perf_counter() - started:.0f} s')


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sets', default='imagewoof320,imagenette',
                   help='names under ../shared/data; the first is the main set')
    p.add_argument('--res', default='160,192,224')
    p.add_argument('--min-samples', type=int, default=3000,
                   help='images per epoch (short epochs understate ffcv: each starts empty)')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--runs', type=int, default=3, help='timed epochs per row (median)')
    p.add_argument('--no-ablations', action='store_true')
    p.add_argument('--peers', default=','.join(PEERS),
                   help=f'loaders measured beside ours, of {",".join(PEERS)} (dali: DALI\'s CPU '
                        f'pipeline without and with antialias, on the main set, when DALI is '
                        f'installed)')
    p.add_argument('--out', default=str(RESULTS))
    args = p.parse_args(argv)
    args.res_list = [int(r) for r in args.res.split(',')]
    args.peer_list = [name for name in args.peers.split(',') if name]
    unknown = set(args.peer_list) - set(PEERS)
    if unknown:
        p.error(f'--peers: unknown {",".join(sorted(unknown))} (choose from {",".join(PEERS)})')
    return args


def dali_available() -> bool:
    """Whether DALI can be measured; prints its version, or the line saying its rows are
    skipped."""
    missing = dali_missing()
    if missing:
        print(missing)
        return False
    from importlib.metadata import version
    print(f'DALI {version(DALI_PIN.split("==")[0])}, CPU pipeline (device_id=None)')
    return True


def measure_set(name, root, folder, args, peers, *, main_set: bool) -> list:
    """The rows of one image set: the decode limit, ours and ffcv's stock loader on its beton,
    DALI's CPU pipeline on the same JPEG bytes (on the main set only: 50 s a set), torchvision on
    the original JPEGs; the peers as ``peers`` asks."""
    samples = pooled_samples(root, args.min_samples)
    beton = stored_beton(samples, folder)
    n_bytes = round(stored_bytes_per_image(beton))
    source_bytes = np.mean([os.path.getsize(s) for s, _ in samples])
    workers, bs = os.cpu_count(), args.batch_size
    base = {'data': name, 'workers': workers, 'batch_size': bs, 'images': len(samples),
            **STORAGE, 'order': 'random', 'in_memory': 1, 'ablation': ''}
    print(f'\n{name}: {len(samples)} images from {root}; stored {n_bytes / 1e3:.1f} kB '
          f'per image (original JPEGs {source_bytes / 1e3:.1f} kB)', flush=True)
    rows = [{**base, 'pipeline': 'decode_limit', 'res': '', 'bytes_per_image': n_bytes,
             **decode_limit(beton, args.runs)}]
    for pipeline, make in FFCV_LOADERS.items():
        if pipeline == 'ffcv' or pipeline in peers:
            make = functools.partial(make, beton, res=args.res_list[0], workers=workers,
                                     batch_size=bs)
            rows += [{**base, 'pipeline': pipeline, 'bytes_per_image': n_bytes, **r}
                     for r in measure(make, args.res_list, args.runs)]
    if 'dali' in peers and main_set:
        files = dali_files(beton, folder / 'dali_files')
        for pipeline, antialias in (('dali', False), ('dali_antialias', True)):
            for res in args.res_list:
                loader = dali_loader(files, res=res, workers=workers, batch_size=bs,
                                     antialias=antialias)
                rows.append({**base, 'pipeline': pipeline, 'res': res, 'bytes_per_image': n_bytes,
                             **time_epochs(dali_epoch(loader), args.runs)})
                del loader
                gc.collect()
    if 'torchvision' in peers:
        for res in args.res_list:
            loader = torchvision_loader(root, len(samples), res=res, workers=workers,
                                        batch_size=bs)
            rows.append({**base, 'pipeline': 'torchvision', 'res': res, 'write_mode': '',
                         'max_res': '', 'jpeg_quality': '', 'bytes_per_image': round(source_bytes),
                         **time_epochs(epoch_of(loader), args.runs)})
            del loader
    return rows


def add_ratios(rows) -> None:
    """Each row's img/s against torchvision's, DALI's and the decode limit of the same set (and
    resolution)."""
    for row in rows:
        same = [r for r in rows if r['data'] == row['data'] and r['ablation'] == '']
        tv = [r for r in same if r['pipeline'] == 'torchvision' and r['res'] == row['res']]
        dali = [r for r in same if r['pipeline'] == 'dali' and r['res'] == row['res']]
        limit = [r for r in same if r['pipeline'] == 'decode_limit']
        if row['pipeline'] not in ('decode_limit', 'torchvision'):
            if tv:
                row['x_torchvision'] = round(row['img_per_s'] / tv[0]['img_per_s'], 2)
            row['pct_of_decode_limit'] = round(100 * row['img_per_s'] / limit[0]['img_per_s'], 1)
        if row['pipeline'] == 'ffcv' and dali:
            row['x_dali'] = round(row['img_per_s'] / dali[0]['img_per_s'], 2)


def ablations(name, root, folder, args, res) -> list:
    """One storage or pipeline choice changed at a time from the defaults, at ``res`` px."""
    samples = pooled_samples(root, args.min_samples)
    workers, bs = os.cpu_count(), args.batch_size
    base = {'data': name, 'pipeline': 'ffcv', 'res': res, 'workers': workers, 'batch_size': bs,
            'images': len(samples), **STORAGE, 'order': 'random', 'in_memory': 1}
    variants = [('defaults', {}, {})]
    variants += [(f'write_mode={m}', {'write_mode': m}, {}) for m in ('raw', 'proportion')]
    variants += [(f'max_res={m}', {'max_res': m}, {}) for m in (160, 512)]
    variants += [(f'jpeg_quality={q}', {'jpeg_quality': q}, {}) for q in (75, 95)]
    variants += [('restart_interval=0 (no markers)', {'restart_interval': 0}, {})]
    variants += [('order=quasi_random', {}, {'order': 'quasi_random'}),
                 ('in_memory=0 (ffcv process cache)', {}, {'in_memory': 0})]
    variants += [(f'workers={w}', {}, {'workers': w}) for w in range(1, workers)]
    variants += [(f'batch_size={b}', {}, {'batch_size': b}) for b in (128,) if b != bs]
    rows = []
    print(f'\nablations on {name} at {res} px:', flush=True)
    for label, storage, loading in variants:
        beton = stored_beton(samples, folder, **storage)
        settings = {'workers': workers, 'batch_size': bs, 'in_memory': 1, 'order': 'random',
                    **loading}
        gc.collect()
        with PeakRSS() as whole:  # loader construction and buffers included
            r = measure(lambda: our_loader(beton, res=res, **settings), [res], args.runs)[0]
        rows.append({**base, **storage, **settings, 'ablation': label, **r,
                     'peak_rss_mb': round(whole.peak_mb),
                     'bytes_per_image': round(stored_bytes_per_image(beton))})
        print(f'  {label}: {r["img_per_s"]:.0f} img/s', flush=True)
    return rows


def print_tables(rows, res_list):
    for name in dict.fromkeys(r['data'] for r in rows):
        main = [r for r in rows if r['data'] == name and r['ablation'] == '']
        if not main:
            continue
        print(f'\n### Loader throughput: {name} ({main[0]["images"]} images, {main[0]["workers"]} '
              f'workers, batch {main[0]["batch_size"]}; median of the timed epochs)\n')
        main.sort(key=lambda r: (ORDER.get(r['pipeline'], len(ORDER)), str(r['res'])))
        print(markdown_table(main, [
            ('pipeline', 'pipeline', ''), ('res', 'res', ''), ('img_per_s', 'img/s', ',.0f'),
            ('spread', 'spread', ',.0f'), ('x_torchvision', 'x torchvision', '.2f')]
            + [('x_dali', 'x DALI', '.2f')] * any('x_dali' in r for r in main) + [
            ('pct_of_decode_limit', '% of decode limit', '.0f'),
            ('bytes_per_image', 'bytes/image', ',d'), ('peak_rss_mb', 'peak RSS MB', ',d')]))
    ablation = [r for r in rows if r['ablation']]
    if ablation:
        print(f'\n### Ablations: {ablation[0]["data"]}, ours at {ablation[0]["res"]} px, one '
              f'setting changed at a time\n')
        print(markdown_table(ablation, [
            ('ablation', 'setting', ''), ('img_per_s', 'img/s', ',.0f'),
            ('spread', 'spread', ',.0f'), ('pct_of_decode_limit', '% of decode limit', '.0f'),
            ('bytes_per_image', 'bytes/image', ',d'), ('peak_rss_mb', 'peak RSS MB', ',d')]))
        print('\n(decode limit: the default storage\'s; peak RSS: the whole process, loader '
              'buffers included)')


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    main = [r for r in rows if not r['ablation'] and r['pipeline'] != 'decode_limit']
    ablation = [r for r in rows if r['ablation']]
    fig, axes = plt.subplots(1, 2 if ablation else 1, figsize=(13 if ablation else 7, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    groups = list(dict.fromkeys((r['data'], r['res']) for r in main))
    pipelines = list(dict.fromkeys(r['pipeline'] for r in main))
    width = 0.8 / len(pipelines)
    for k, pipeline in enumerate(pipelines):
        values = [next((r['img_per_s'] for r in main if (r['data'], r['res']) == g
                        and r['pipeline'] == pipeline), 0) for g in groups]
        ax.bar(np.arange(len(groups)) + k * width, values, width, label=pipeline)
    for i, name in enumerate(dict.fromkeys(g[0] for g in groups)):
        limit = [r for r in rows if r['data'] == name and r['pipeline'] == 'decode_limit']
        xs = [j for j, g in enumerate(groups) if g[0] == name]
        ax.hlines(limit[0]['img_per_s'], xs[0] - 0.2, xs[-1] + 0.8, colors='k',
                  linestyles='dashed', label='decode limit' if i == 0 else None)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2,
                  [f'{d}\n{r} px' for d, r in groups], fontsize=7, rotation=30)
    ax.set_ylabel('img/s')
    ax.set_title('loader throughput')
    ax.legend(fontsize=8)
    if ablation:
        ax = axes[0][1]
        ax.barh([r['ablation'] for r in ablation], [r['img_per_s'] for r in ablation])
        ax.invert_yaxis()
        ax.set_xlabel('img/s')
        ax.set_title(f'ablations ({ablation[0]["data"]}, {ablation[0]["res"]} px)')
        ax.tick_params(axis='y', labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == '__main__':
    main()
