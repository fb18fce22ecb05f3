"""The converter (write_beton.py: sources, images, writer) and the loaders, on real JPEGs."""
import functools
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PYTHON, REPO, SAMPLE, SHARED_DATA, decoder_node, run_env
from imagenet_ffcv import betons, images, loaders, sources, verify, writer
from imagenet_ffcv.classes import class_list_path
from imagenet_ffcv.errors import InputError


def beton_metadata(path):
    r = verify.records(path)
    return r['width'].astype(int), r['height'].astype(int), r['label'].astype(int)


def decode_all(path):
    """Every image of a beton whose images share one size, decoded as stored: (N, H, W, 3) uint8."""
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from ffcv.fields.basics import IntDecoder
    loader = Loader(str(path), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={'image': [SimpleRGBImageDecoder(), ToTensor()],
                                                'label': [IntDecoder(), ToTensor()]})
    return np.concatenate([x.numpy().copy() for x, _ in loader])


def sample_images(n):
    return sorted((SAMPLE / 'train').glob('*/*.JPEG'))[:n]


def expected_size(w, h, max_res):
    """The shorter-side rule, worked independently of the code under test."""
    if min(w, h) <= max_res:
        return w, h
    if w < h:
        return max_res, round(h * max_res / w)
    return round(w * max_res / h), max_res


@pytest.fixture
def aspect_tree(tmp_path):
    """train/ and val/ with real photos stretched to ImageNet-like sizes and colour modes."""
    sources = sample_images(8)
    specs = [  # (class, size, mode, format)
        ('n01', (500, 375), 'RGB', 'JPEG'), ('n01', (375, 500), 'RGB', 'JPEG'),
        ('n01', (1200, 900), 'RGB', 'JPEG'), ('n02', (200, 150), 'RGB', 'JPEG'),
        ('n02', (640, 256), 'L', 'JPEG'), ('n02', (300, 1000), 'CMYK', 'JPEG'),
        ('n03', (320, 480), 'RGB', 'PNG'), ('n03', (257, 256), 'RGB', 'JPEG')]
    expected = []
    for i, ((wnid, size, mode, fmt), src) in enumerate(zip(specs, sources)):
        for split in ('train', 'val'):
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            Image.open(src).convert('RGB').resize(size).convert(mode).save(
                folder / f'img{i}.JPEG', format=fmt, quality=95)
        expected.append((wnid, size))
    return tmp_path, expected


def test_shorter_side_size():
    assert images.shorter_side_size(500, 375, 256) == (341, 256)
    assert images.shorter_side_size(375, 500, 256) == (256, 341)
    assert images.shorter_side_size(200, 150, 256) == (200, 150)  # never upscaled
    assert images.shorter_side_size(256, 1000, 256) == (256, 1000)


def test_shorter_side_rule_and_labels(aspect_tree, tmp_path):
    root, expected = aspect_tree
    classes = sources.find_classes(root / 'train')
    assert classes == ['n01', 'n02', 'n03']
    samples = sources.list_samples(root / 'train', classes)
    writer.write_beton(samples, tmp_path / 'out.beton', max_res=256, num_workers=2)
    widths, heights, labels = beton_metadata(tmp_path / 'out.beton')
    for (wnid, (w, h)), width, height, label in zip(expected, widths, heights, labels):
        assert (width, height) == expected_size(w, h, 256), (wnid, w, h)
        assert label == classes.index(wnid)
    assert min(widths.min(), heights.min()) == 150  # the small image kept its size


@pytest.mark.skipif(not (SHARED_DATA / 'imagewoof320').is_dir(),
                    reason='needs ../shared/data/imagewoof320 (real aspect ratios); the generated '
                           'aspect-ratio images of test_shorter_side_rule_and_labels still run')
def test_shorter_side_rule_on_imagewoof320(tmp_path):
    root = SHARED_DATA / 'imagewoof320'
    classes = sources.find_classes(root / 'train')
    samples = sources.list_samples(root / 'val', classes)
    writer.write_beton(samples, tmp_path / 'woof.beton', max_res=256, num_workers=2)
    widths, heights, labels = beton_metadata(tmp_path / 'woof.beton')
    for (path, label), w, h, stored_label in zip(samples, widths, heights, labels):
        assert (w, h) == expected_size(*Image.open(path).size, 256), path
        assert stored_label == label == classes.index(path.split('/')[-2])


@pytest.mark.parametrize('write_mode,tolerance', [('raw', 1.5), ('jpg', 4.0)])
def test_pixels_match_pil_reference(tmp_path, write_mode, tolerance):
    """Stored pixels are PIL's RGB conversion + antialiased resize of the original file (the
    draft-mode decode of big JPEGs and the JPEG re-encoding stay within a small error)."""
    folder = tmp_path / 'train' / 'n01'
    folder.mkdir(parents=True)
    references = []
    for i, src in enumerate(sample_images(6)):
        im = Image.open(src).convert('RGB').resize((1200, 900), Image.Resampling.BICUBIC)
        if i == 0:
            im = im.convert('L')  # a grayscale JPEG, as 39 of the shared images are
        im.save(folder / f'{i}.JPEG', quality=95)
        ref = Image.open(folder / f'{i}.JPEG').convert('RGB').resize(
            (341, 256), Image.Resampling.BILINEAR)
        references.append(np.asarray(ref, dtype=np.float64))
    samples = sources.list_samples(tmp_path / 'train', ['n01'])
    writer.write_beton(samples, tmp_path / 'x.beton', max_res=256, write_mode=write_mode,
                     num_workers=1)
    decoded = decode_all(tmp_path / 'x.beton')
    assert decoded.shape == (6, 256, 341, 3)
    for got, ref in zip(decoded, references):
        assert np.abs(got - ref).mean() < tolerance
    gray = decoded[0].astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all() \
        if write_mode == 'raw' else np.abs(gray[..., 0] - gray[..., 2]).mean() < 2


def test_val_split_missing_a_class_keeps_train_indices(aspect_tree, tmp_path):
    root, _ = aspect_tree
    for f in (root / 'val' / 'n01').iterdir():
        f.unlink()
    (root / 'val' / 'n01').rmdir()
    classes = sources.find_classes(root / 'train')
    with pytest.warns(UserWarning, match=r'1 of the 3 train classes have no folder here \(n01\)'):
        samples = sources.list_samples(root / 'val', classes)
    assert {label for _, label in samples} == {1, 2}
    writer.write_beton(samples, tmp_path / 'val.beton', max_res=64, num_workers=1)
    *_, labels = beton_metadata(tmp_path / 'val.beton')
    assert sorted(set(labels.tolist())) == [1, 2]
    assert labels.tolist() == [label for _, label in samples]


def test_val_folder_unknown_to_train_is_an_error(aspect_tree):
    root, _ = aspect_tree
    (root / 'val' / 'n99').mkdir()
    with pytest.raises(ValueError, match='n99'):
        sources.list_samples(root / 'val', sources.find_classes(root / 'train'))


def test_unreadable_image_fails_cleanly_and_keeps_previous_file(aspect_tree, tmp_path):
    root, _ = aspect_tree
    classes = sources.find_classes(root / 'train')
    out_dir = tmp_path / 'out'
    out = out_dir / 'train.beton'
    writer.write_beton(sources.list_samples(root / 'train', classes), out, max_res=64, num_workers=2)
    before = out.read_bytes()
    bad = root / 'train' / 'n02' / 'truncated.JPEG'
    bad.write_bytes((root / 'train' / 'n01' / 'img0.JPEG').read_bytes()[:300])
    (root / 'train' / 'n03' / 'empty.JPEG').write_bytes(b'')
    with pytest.raises(writer.UnreadableImagesError) as err:
        writer.write_beton(sources.list_samples(root / 'train', classes), out, max_res=64, num_workers=2)
    assert {p.split('/')[-1] for p, _ in err.value.failures} == {'truncated.JPEG', 'empty.JPEG'}
    assert 'truncated.JPEG' in str(err.value)
    assert out.read_bytes() == before  # the previous complete file is untouched
    assert sorted(p.name for p in out_dir.iterdir()) == ['train.beton']  # no temporary left
    # every image bad, skipping asked for: the remedy was "without --strict, skip them"
    samples = [(str(bad), 0), (str(root / 'train' / 'n03' / 'empty.JPEG'), 1)]
    with pytest.raises(writer.UnreadableImagesError, match=r"2 image\(s\) could not be decoded or "
                       r"stored; nothing was written. They are all of the split's images"):
        writer.write_beton(samples, out, max_res=64, num_workers=1, skip_unreadable=True)
    assert out.read_bytes() == before


@pytest.mark.slow
def test_write_beton_cli(tmp_path):
    out = tmp_path / 'b' / 'train_64.beton'
    proc = subprocess.run([PYTHON, 'write_beton.py', '--data-dir', str(SAMPLE), '--split', 'val',
                           '--max-res', '64', '--out', str(out), '--subset', '20',
                           '--num-workers', '2'], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '20 images' in proc.stdout and 'img/s' in proc.stdout
    rows = [line.split('\t') for line in class_list_path(out).read_text().splitlines()]
    assert rows[0] == ['0', 'n01440764', 'tench'] and len(rows) == 10
    assert betons.num_samples(out) == 20
    missing = subprocess.run([PYTHON, 'write_beton.py', '--data-dir', str(tmp_path / 'nowhere'),
                              '--split', 'train'], cwd=REPO, env=run_env(), capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode != 0 and 'nowhere' in missing.stderr
    # the converter's warnings are one line each, naming the command (they were Python's
    # 'path/sources.py:272: UserWarning: ...' followed by a line of its source code)
    tree = tmp_path / 'own' / 'train'
    for name in ('a', 'b'):
        (tree / name).mkdir(parents=True)
    for src in sorted((SAMPLE / 'val' / 'n01440764').glob('*.JPEG'))[:2]:
        (tree / 'a' / src.name).write_bytes(src.read_bytes())
    (tree / 'a' / 'notes.txt').write_text('not an image')
    own = subprocess.run([PYTHON, 'write_beton.py', '--data-dir', str(tree.parent), '--split',
                          'train', '--max-res', '32', '--out', str(tmp_path / 'own.beton')],
                         cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert own.returncode == 0, own.stderr
    assert ': 2 images, 1 of 2 classes, 0 skipped' in own.stdout
    warned = [line for line in own.stderr.splitlines() if line.startswith('write_beton.py: ')]
    assert len(warned) == 2 and all(line.startswith('write_beton.py: warning: ') for line in warned)
    assert 'notes.txt' in warned[0] and f'{tree / "b"}; their classes keep' in warned[1]
    assert 'UserWarning' not in own.stderr and 'return classes' not in own.stderr


def test_loaders_on_cpu(sample_betons):
    """Train batches: normalised float32, channels_last, resolution changed between epochs without
    a new loader; val slices across ranks cover every image exactly once."""
    cpu = torch.device('cpu')
    loader, decoder = loaders.train_loader(path=sample_betons['train'], batch_size=32, num_workers=2,
                                        res=32, os_cache=True, device=cpu, distributed=False,
                                        seed=0)
    shapes = set()
    for res in (32, 48):
        decoder.output_size = (res, res)
        for x, y in loader:
            shapes.add(tuple(x.shape))
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.is_contiguous(memory_format=torch.channels_last)
    assert shapes == {(32, 3, 32, 32), (32, 3, 48, 48)}
    assert len(loader) == 340 // 32
    assert abs(float(x.mean())) < 1.0 and 0.5 < float(x.std()) < 1.5  # normalised
    labels = []
    for rank in range(3):
        val = loaders.val_loader(path=sample_betons['val'], batch_size=16, num_workers=2, res=32,
                              device=cpu, rank=rank, world_size=3)
        labels.append(torch.cat([y.clone() for _, y in val]))
    assert sum(len(l) for l in labels) == 100
    assert sorted(torch.cat(labels).tolist()) == sorted(np.repeat(np.arange(10), 10).tolist())


def test_an_os_cache_loader_leaves_numbas_shared_array_type_as_it_was(sample_betons):
    """ffcv 1.0.2's os_cache reader set ``mutable = False`` on numba's interned ``uint8[::1]``
    type, which corrupted numba's dictionaries keyed by it (KeyError in its dispatchers, and a
    loader that hangs when a later pipeline compiles against one of them); loaders.py types that
    reader with its own read-only type. Two loaders, and the type is still the mutable one."""
    import numba
    shared = numba.uint8[::1]
    for res in (32, 64):
        loader = loaders.val_loader(path=sample_betons['val'], batch_size=16, num_workers=2,
                                    res=res, device=torch.device('cpu'))
        assert sum(len(y) for _, y in loader) == 100
    assert shared.mutable and numba.uint8[::1] is shared


# Each package module that uses ffcv, imported first in a fresh process: ffcv's image modes are a
# dict, numba's typed Dict is numba's again, and none of its dictionary code was compiled.
FFCV_IMPORT_RUN = """
import importlib, sys
importlib.import_module(sys.argv[1])
import numba.typed
from numba.typed import typeddict
from ffcv.fields import rgb_image
compiled = sorted(name for name in dir(typeddict)
                  if getattr(getattr(typeddict, name), 'signatures', None))
print(type(rgb_image.IMAGE_MODES).__name__, numba.typed.Dict is typeddict.Dict, compiled)
"""


@pytest.mark.parametrize('module', ['loaders', 'writer'])  # the trainer's, the converter's
def test_importing_ffcv_through_the_package_compiles_no_numba_dictionary(module):
    """ffcv 1.0.2 fills a numba typed Dict of its two image modes when imported (2-3 s of
    compiling in every process); the package imports ffcv with a dict in its place
    (``ffcv_import``), which ffcv and the package read in Python only. The converter and the
    training runs that this suite starts, and its pytest processes when a module of the package
    is the first to import ffcv, read the modes from that dict; test_layout.py checks that every
    module using ffcv imports ``ffcv_import`` first."""
    proc = subprocess.run([PYTHON, '-c', FFCV_IMPORT_RUN, f'imagenet_ffcv.{module}'],
                          capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ['dict', 'True', '[]']


def test_the_loader_reuses_its_batch_buffers_across_epochs_without_changing_the_batches(
        sample_betons):
    """Epochs share ffcv's batch buffers (same memory) when the shapes are the same and the last
    epoch has ended; a new resolution, or an epoch still being produced (abandoned before its
    end), gets new ones. The batches are those of the same epoch decoded into new buffers, as
    ffcv 1.0.2 does for every epoch."""
    from ffcv.pipeline.graph import Graph
    loader, decoder = loaders.train_loader(path=sample_betons['train'], batch_size=32,
                                           num_workers=2, res=32, os_cache=True,
                                           device=torch.device('cpu'), distributed=False, seed=3)

    def epoch():
        batches = [(x.clone(), y.clone(), x.data_ptr()) for x, y in loader]
        return (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]),
                {b[2] for b in batches})

    x0, _, memory0 = epoch()
    x1, y1, memory1 = epoch()
    assert memory1 == memory0  # the same ring of buffers
    assert not torch.equal(x0, x1)  # other crops and order: a real second epoch
    loader.next_epoch = 1  # epoch 1 again, into new buffers (ffcv's own allocation)
    reuse, loader.graph.allocate_memory = (loader.graph.allocate_memory,
                                           functools.partial(Graph.allocate_memory, loader.graph))
    again_x1, again_y1, again_memory = epoch()
    assert again_memory.isdisjoint(memory0)
    assert torch.equal(x1, again_x1) and torch.equal(y1, again_y1)

    loader.graph.allocate_memory = reuse
    decoder.output_size = (48, 48)
    ring = loader._buffers  # held here: freed, its memory could hold the new ring by chance
    x2, _, memory2 = epoch()
    assert x2.shape[-1] == 48 and memory2.isdisjoint(memory0) and loader._buffers is not ring
    abandoned = iter(loader)
    next(abandoned)  # its thread goes on producing into its buffers
    _, _, memory4 = epoch()
    assert memory4.isdisjoint(memory2)
    abandoned.close()


def test_the_decoders_scratch_memory_has_a_row_per_thread_not_per_image(sample_betons):
    """The decoder's scratch memory (a whole image's pixels per row: the .beton's largest height x
    largest width x 3 bytes) comes as min(batch, numba's thread pool) rows per slot of the ring,
    where ffcv 1.0.2 allocates (and on CUDA pins) one per image. A batch smaller than the pool
    decodes each image in a row of its own: batches of 1 give the batches of 16."""
    import numba
    from ffcv.pipeline.graph import Graph

    def loader_of(batch_size):
        return loaders.val_loader(path=sample_betons['val'], batch_size=batch_size, num_workers=2,
                                  res=32, device=torch.device('cpu'))

    loader = loader_of(16)
    node, slots = decoder_node(loader), loader.batches_ahead + 2
    pixels, scratch, _ = loaders.allocate(loader.graph, 16, slots)['operation'][node]
    _, ffcv_scratch, _ = Graph.allocate_memory(loader.graph, 16, slots)['operation'][node]
    widths, heights, _ = beton_metadata(sample_betons['val'])
    row = int(heights.max()) * int(widths.max()) * 3
    assert pixels.shape[:2] == (slots, 16) and ffcv_scratch.shape == (slots, 16, row)
    assert scratch.shape == (slots, min(16, numba.config.NUMBA_NUM_THREADS), row)
    one_by_one = torch.cat([x.clone() for x, _ in loader_of(1)])
    assert torch.equal(one_by_one, torch.cat([x.clone() for x, _ in loader]))


def test_a_training_epoch_does_not_depend_on_the_threads_or_how_they_share_a_batch(
        sample_betons, monkeypatch):
    """Crops and flips are keyed by (seed, epoch, image) and each thread decodes into a buffer of
    its own, so 1 thread and 2 threads taking 3 images at a time as they get free
    (``decoders.PARALLEL_CHUNK``; ``decoders.take_images``, as with the default 1) give the same
    epoch, bit for bit."""
    from imagenet_ffcv import decoders

    def epoch(threads, chunk):
        monkeypatch.setattr(decoders, 'PARALLEL_CHUNK', chunk)
        loader, _ = loaders.train_loader(path=sample_betons['train'], batch_size=32,
                                         num_workers=threads, res=32, os_cache=True,
                                         device=torch.device('cpu'), distributed=False, seed=5)
        batches = [(x.clone(), y.clone()) for x, y in loader]
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    x, y = epoch(1, decoders.PARALLEL_CHUNK)
    assert len(y) == 320 and float(x.std()) > 0.5
    other_x, other_y = epoch(2, 3)
    assert torch.equal(other_x, x) and torch.equal(other_y, y)


# Run in a process of its own per numba threading layer (chosen before the first parallel loop):
# image 0 is held until every other image of the batch is done, so the batch finishes only if the
# other thread takes the images that a static split would have left to image 0's thread.
THREADING_LAYER_RUN = """
import json, numba, numpy as np
from imagenet_ffcv.decoders import fetch_add, take_images

@numba.njit(parallel=True)
def share(count, chunk, spins_allowed):
    counter, done, who = np.zeros(1, np.int64), np.zeros(1, np.int64), np.full(count, -1)
    held = np.zeros(1, np.int64)
    for _ in numba.prange(numba.get_num_threads()):
        first, last = take_images(counter, chunk, count)
        while first < last:
            for k in range(first, last):
                spins = 0
                while k == 0 and fetch_add(done, 0) < count - 1 and spins < spins_allowed:
                    spins += 1
                fetch_add(held, spins)
                who[k] = numba.get_thread_id()
                fetch_add(done, 1)
            first, last = take_images(counter, chunk, count)
    return who, held[0]

numba.set_num_threads(2)
who, spins = share(16, 1, 10 ** 9)
print(json.dumps({'layer': numba.threading_layer(), 'who': who.tolist(), 'spins': int(spins)}))
"""


@pytest.mark.parametrize('layer', ['workqueue', 'omp'])
def test_loader_threads_take_images_as_they_get_free_with_every_threading_layer(layer):
    """numba's own dynamic scheduling (``set_parallel_chunksize``) works with its TBB layer only:
    its OpenMP and workqueue layers split a loop into equal shares. The loaders' threads share a
    batch through ``decoders.take_images`` instead, so with those layers too a thread that is
    held up on one image leaves the others to the free thread (which thread decodes which image
    does not change the epoch: test_a_training_epoch_does_not_depend_on_the_threads...)."""
    proc = subprocess.run([PYTHON, '-c', THREADING_LAYER_RUN], capture_output=True, text=True,
                          timeout=300, env={**run_env(), 'NUMBA_THREADING_LAYER': layer}, cwd=REPO)
    if proc.returncode and 'No threading layer could be loaded' in proc.stderr:
        pytest.skip(f'numba cannot load its {layer} threading layer on this machine (omp needs '
                    f'GNU OpenMP, libgomp.so.1): the loader does not use it here')
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    who = found['who']  # the thread that took each image
    assert found['layer'] == layer and sorted(set(who)) == [0, 1]
    assert who.count(who[0]) == 1  # image 0's thread took no other image
    assert found['spins'] < 10 ** 9  # image 0 was let go by the others being done, not the limit


def test_an_unknown_copy_wait_is_refused_when_the_loader_is_made(sample_betons, monkeypatch):
    monkeypatch.setattr(loaders, 'COPY_WAIT', 'never')
    with pytest.raises(ValueError, match=r"loaders.COPY_WAIT='never': expected 'batch' or 'slot'"):
        loaders.val_loader(path=sample_betons['val'], batch_size=16, num_workers=1, res=32,
                           device=torch.device('cpu'))


def small_train_loader(sample_betons, *, batch_size, os_cache=True, seed=0):
    """The training loader of the demo sample's 340 images at 32 px, 2 threads, on the CPU."""
    loader, _ = loaders.train_loader(path=sample_betons['train'], batch_size=batch_size,
                                     num_workers=2, res=32, os_cache=os_cache,
                                     device=torch.device('cpu'), distributed=False, seed=seed)
    return loader


def tiny_classifier():
    """A model that trains on those batches in a few milliseconds (10 classes)."""
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(3, 10))


def next_within(iterator, seconds):
    """``next(iterator)`` or what it raised, taken in a thread; pytest.fail after ``seconds``
    (a loader waiting for ever would hang the suite instead)."""
    got = []

    def take():
        try:
            got.append(next(iterator))
        except BaseException as e:  # noqa: BLE001 - returned to the test
            got.append(e)
    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    taker.join(seconds)
    if not got:
        pytest.fail(f'next() still waiting after {seconds} s')
    return got[0]


def wait_until(condition, what, seconds=60):
    """Poll ``condition()`` until it is true; pytest.fail naming ``what`` after ``seconds``."""
    for _ in range(int(seconds * 10)):
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f'{what}: not within {seconds} s')


def test_closing_an_epoch_returns_once_its_thread_has_stopped(sample_betons):
    """``close`` on an epoch left after its first batch: its thread has ended when close returns
    (ffcv's close only asks it to stop), and the epoch gives no more batches."""
    loader = small_train_loader(sample_betons, batch_size=16)
    epoch = iter(loader)
    next(epoch)
    epoch.close()
    assert not epoch.is_alive()
    with pytest.raises(StopIteration):
        next(epoch)


def test_an_error_in_the_loader_thread_is_raised_by_the_consumers_next(sample_betons,
                                                                        monkeypatch):
    """An exception while the thread decodes a batch is raised where the batches are taken (the
    batches before it first); ffcv's thread dies with it, and the consumer waits for ever."""
    from imagenet_ffcv import epoch_iterator
    decode = epoch_iterator.EpochIterator.run_pipeline

    def fail_at_the_third_batch(self, b_ix, *args):
        if b_ix == 2:
            raise MemoryError('no memory for batch 2')
        return decode(self, b_ix, *args)
    monkeypatch.setattr(epoch_iterator.EpochIterator, 'run_pipeline', fail_at_the_third_batch)
    loader = loaders.val_loader(path=sample_betons['val'], batch_size=16, num_workers=2, res=32,
                                device=torch.device('cpu'))
    epoch = iter(loader)
    taken = [next_within(epoch, 60) for _ in range(3)]
    assert all(isinstance(t, tuple) and len(t) == 2 for t in taken[:2])  # (images, labels)
    assert isinstance(taken[2], MemoryError) and str(taken[2]) == 'no memory for batch 2'
    assert not epoch.is_alive()
    assert isinstance(next_within(epoch, 60), StopIteration)


def test_a_beton_gone_before_an_epoch_of_the_process_cache_is_an_error_not_a_hang(
        sample_betons, tmp_path):
    """data.in_memory=0 (ffcv's process cache) opens the .beton again as each epoch starts: a
    file deleted (or unreadable) by then is raised where the batches are taken. ffcv's page
    reader threads died with the error, and the loader waited for their pages for ever."""
    copy = tmp_path / 'train.beton'
    shutil.copy(sample_betons['train'], copy)
    loader, _ = loaders.train_loader(path=copy, batch_size=32, num_workers=2, res=32,
                                     os_cache=False, device=torch.device('cpu'),
                                     distributed=False, seed=0)
    copy.unlink()
    got = next_within(iter(loader), 60)
    assert isinstance(got, FileNotFoundError) and str(copy) in str(got), got


def test_an_epoch_dropped_before_its_end_leaves_its_memory_when_its_thread_ends(sample_betons,
                                                                             monkeypatch):
    """An epoch whose iterator is dropped after its first batch (``next(iter(loader))``) while its
    thread still decodes: the last reference goes in that thread when it ends, and the epoch then
    leaves ffcv's memory context there, without waiting on its own thread (which would be
    CLOSE_WAIT_S, an hour here)."""
    from imagenet_ffcv import epoch_iterator
    monkeypatch.setattr(epoch_iterator, 'CLOSE_WAIT_S', 3600)
    decode, leave = (epoch_iterator.EpochIterator.run_pipeline,
                     epoch_iterator.EpochIterator._leave_memory_context)
    dropped, left = threading.Event(), []

    def decode_once_dropped(self, b_ix, *args):
        if b_ix == 1:  # the last batch of the epoch
            dropped.wait(60)
        return decode(self, b_ix, *args)

    def record(self):  # (the epoch's thread name, the thread leaving), for every epoch: names
        # are unique in a process, where a new thread may get the id of one that has ended
        left.append((self.name, threading.get_ident()))
        leave(self)
    monkeypatch.setattr(epoch_iterator.EpochIterator, 'run_pipeline', decode_once_dropped)
    monkeypatch.setattr(epoch_iterator.EpochIterator, '_leave_memory_context', record)
    loader = loaders.val_loader(path=sample_betons['val'], batch_size=64, num_workers=2, res=32,
                                device=torch.device('cpu'))  # 2 batches
    dummies = {t for t in threading.enumerate() if isinstance(t, threading._DummyThread)}
    next(iter(loader))
    epoch = loader._last_epoch  # a weak reference
    name, thread = epoch().name, epoch().ident
    dropped.set()
    wait_until(lambda: epoch() is None, 'the epoch collected')
    assert [e for e in left if e[0] == name] == [(name, thread)]  # once, by its own thread
    assert {t for t in threading.enumerate() if isinstance(t, threading._DummyThread)} == dummies


def test_a_new_epoch_leaves_the_batches_not_yet_taken_of_the_last_one_as_they_were(
        sample_betons):
    """An epoch whose thread has decoded all its batches, its consumer not having taken them all,
    and a new epoch that has decoded all of its own meanwhile: the last batch of the first, taken
    then, is the batch decoded for it, not one the new epoch wrote into the same buffers (they
    are reused only once an epoch was run to its end or closed)."""
    loader = small_train_loader(sample_betons, batch_size=160)  # 2 batches an epoch
    expected = [x.clone() for x, _ in loader][1]  # epoch 0's second batch
    loader.next_epoch = 0  # epoch 0 again
    first = iter(loader)
    next(first)
    wait_until(first.has_stopped, 'the first epoch decoded')  # its last batch, then the end
    second = iter(loader)  # epoch 1
    wait_until(second.has_stopped, 'the second epoch decoded')
    assert torch.equal(next(first)[0], expected)
    second.close()


@pytest.mark.parametrize('os_cache', [True, False])  # the OS's page cache, ffcv's own cache
def test_an_epoch_started_at_a_batch_gives_the_rest_of_the_epoch_and_decodes_only_that(
        sample_betons, monkeypatch, os_cache):
    """``epoch_from(k)`` (a run resumed within an epoch): the batches k.. of the epoch that
    iterating the loader gives (same samples, crops and flips), and its thread decodes only
    them; the loader goes on to the next epoch after it."""
    from imagenet_ffcv import epoch_iterator
    loader = small_train_loader(sample_betons, batch_size=32, os_cache=os_cache,
                                seed=5)  # 340 images: 10 batches
    loader.next_epoch = 2
    whole = [(x.clone(), y.clone()) for x, y in loader]
    decode, decoded = epoch_iterator.EpochIterator.run_pipeline, []

    def counting(self, b_ix, batch_indices, *args):
        decoded.append(len(batch_indices))
        return decode(self, b_ix, batch_indices, *args)
    monkeypatch.setattr(epoch_iterator.EpochIterator, 'run_pipeline', counting)
    loader.next_epoch = 2
    rest = [(x.clone(), y.clone()) for x, y in loader.epoch_from(7)]
    assert decoded == [32] * 3 and len(whole) == 10
    assert len(rest) == 3 and loader.next_epoch == 3
    assert all(torch.equal(x, x0) and torch.equal(y, y0)
               for (x, y), (x0, y0) in zip(rest, whole[7:]))
    assert list(loader.epoch_from(10)) == [] and loader.next_epoch == 4
    with pytest.raises(ValueError, match='first_batch=11: expected 0 to 10'):
        loader.epoch_from(11)


def test_a_training_epoch_stopped_early_or_failed_closes_its_loader_epoch(sample_betons):
    """``engine.train_one_epoch`` stopped after its first step (a stop request), or failing in
    it, leaves no loader thread decoding: the epoch was closed, its buffers free for the next.
    With a progress bar (rank 0): tqdm closes what it iterates only when the bar is disabled."""
    from imagenet_ffcv import engine
    loader = small_train_loader(sample_betons, batch_size=16)  # 21 batches an epoch
    model = tiny_classifier()

    def epoch(loss_fn):
        return engine.train_one_epoch(
            model=model, loader=loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=loss_fn, lr_at=lambda t: 0.1, epoch=0, show_progress=True,
            hooks=engine.EpochHooks(stop_requested=lambda: True, check_every=1))

    stats = epoch(torch.nn.CrossEntropyLoss())
    assert stats['stopped'] and stats['iterations_done'] == 1
    assert loader._last_epoch() is None or not loader._last_epoch().is_alive()
    with pytest.raises(ZeroDivisionError) as failed:
        epoch(lambda logits, y: 1 / 0)
    # closed while the error's traceback, which holds train_one_epoch's frame, is still kept
    assert failed.tb is not None and not loader._last_epoch().is_alive()


def test_a_resume_forced_past_the_epochs_end_trains_nothing_more_in_that_epoch(sample_betons):
    """A checkpoint's iteration past the end of this run's epoch (``checkpoint.force`` after a
    change of batch size or GPUs): the epoch trains on nothing more and counts as done, with no
    error and no batch decoded."""
    from imagenet_ffcv import engine
    loader = small_train_loader(sample_betons, batch_size=64, os_cache=False)  # 5 batches
    model = tiny_classifier()
    stats = engine.train_one_epoch(
        model=model, loader=loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(), lr_at=lambda t: 0.1, epoch=0, show_progress=True,
        start_iteration=8)
    assert stats['images'] == 0 and stats['iterations_done'] == len(loader) == 5
    assert loader.next_epoch == 1 and loader._last_epoch is None  # no epoch thread made


EXIT_WITH_A_BUSY_LOADER = """
import sys, threading, time
import torch
from imagenet_ffcv import epoch_iterator, loaders

decode, busy = epoch_iterator.EpochIterator.run_pipeline, threading.Event()

def decode_then_torch_code(self, b_ix, *args):
    result = decode(self, b_ix, *args)
    if b_ix >= 1:  # inside torch code (which releases the GIL) for a second
        busy.set()
        x, end = torch.zeros(8, 8, 3), time.monotonic() + 1
        while time.monotonic() < end:
            x.permute(2, 0, 1)
    return result

epoch_iterator.EpochIterator.run_pipeline = decode_then_torch_code
loader = loaders.val_loader(path=sys.argv[1], batch_size=16, num_workers=2, res=32,
                            device=torch.device('cpu'))
epoch = iter(loader)
next(epoch)
busy.wait()
print('exiting', flush=True)
"""


@pytest.mark.slow
def test_a_process_ends_cleanly_while_its_loader_thread_is_in_torch_code(sample_betons):
    """A program that leaves an epoch unfinished and ends while the loader's thread is inside torch
    code: without the epoch closed at exit it aborts (-6, 'terminate called without an active
    exception': python/cpython#87135), as bench_train.py once did in the suite."""
    result = subprocess.run([PYTHON, '-c', EXIT_WITH_A_BUSY_LOADER, str(sample_betons['val'])],
                            env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == 'exiting'


def test_gpu_pipeline_order_is_well_formed():
    """On CUDA the decoder writes uint8 and the batch is normalised on the device after
    ToDevice/ToTorchImage (with torch, not ffcv's cupy kernel), to the dtype asked for; on CPU the
    decoder normalises and nothing JIT-compiled follows a non-JIT op (that hangs ffcv 1.0.2's
    Loader)."""
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    from imagenet_ffcv import decoders
    decoder, gpu_ops = loaders.image_pipeline(decoders.center_crop_decoder,
                                              device=torch.device('cuda:0'), dtype=torch.bfloat16,
                                              output_size=(32, 32), ratio=1.0)
    assert [type(op) for op in gpu_ops[1:-1]] == [ToTensor, ToDevice, ToTorchImage]
    assert gpu_ops[0] is decoder and not decoder.normalize
    assert isinstance(gpu_ops[-1], loaders.NormalizeOnDevice)
    assert gpu_ops[-1].dtype == torch.bfloat16
    decoder, cpu_ops = loaders.image_pipeline(decoders.center_crop_decoder,
                                              device=torch.device('cpu'), output_size=(32, 32),
                                              ratio=1.0)
    assert cpu_ops[0] is decoder and [type(op) for op in cpu_ops[1:]] == [ToTensor, ToTorchImage]
    assert decoder.normalize and decoder.output_size == (32, 32)


def test_a_truncated_file_or_not_a_beton_is_a_clear_error_at_loader_creation(sample_betons,
                                                                            tmp_path):
    from imagenet_ffcv.verify import CorruptBetonError
    cpu = torch.device('cpu')
    data = sample_betons['val'].read_bytes()
    photo = (SAMPLE / 'val' / 'n01440764' / 'ILSVRC2012_val_00009111.JPEG').read_bytes()
    # name: (content, message); a file that is not one was "truncated ... at byte 48281..."
    cases = {'half.beton': (data[:len(data) // 2], 'truncated'),
             'cut.beton': (data[:-10], 'truncated'),
             'text.beton': (b'hello, not a beton\n' * 100, 'not a .beton file'),
             'photo.jpg': (photo, 'not a .beton file'),  # and cut within ffcv's header (it was
             'stub.beton': (data[:20], 'truncated or not a .beton file: 20 bytes')}  # IndexError
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        for make in (lambda p: loaders.val_loader(path=p, batch_size=8, num_workers=1, res=32,
                                                  device=cpu),
                     lambda p: loaders.train_loader(path=p, batch_size=8, num_workers=1, res=32,
                                                    os_cache=True, device=cpu,
                                                    distributed=False, seed=0)):
            with pytest.raises(CorruptBetonError, match=f'{name}: {message}'):
                make(tmp_path / name)
    assert betons.num_samples(sample_betons['val']) == 100  # the intact file passes the check
    empty = empty_beton(sample_betons['val'], tmp_path / 'empty.beton')
    with pytest.raises(CorruptBetonError, match='empty.beton: holds no samples'):
        loaders.val_loader(path=empty, batch_size=8, num_workers=1, res=32, device=cpu)
    # the images' folder given instead of its .beton was ".beton file not found"
    with pytest.raises(FileNotFoundError) as info:
        loaders.val_loader(path=SAMPLE / 'val', batch_size=8, num_workers=1, res=32, device=cpu)
    assert str(info.value) == (f'{SAMPLE / "val"}: a folder, not a .beton file; write one from '
                               f'its images with imagenet-ffcv-write --data-dir {SAMPLE} --split '
                               f'val --out FILE.beton')
    with pytest.raises(FileNotFoundError, match='n01440764: a folder, not a .beton file; write one '
                                                'from its images with imagenet-ffcv-write '
                                                '--data-dir DIR --split SPLIT'):
        verify.verify_beton(SAMPLE / 'val' / 'n01440764')  # what --verify FOLDER reads
    with pytest.raises(FileNotFoundError, match='^/dev/null: not a regular file'):  # not found
        verify.verify_beton('/dev/null')
    with pytest.raises(FileNotFoundError, match='nowhere.beton: .beton file not found'):
        loaders.val_loader(path=tmp_path / 'nowhere.beton', batch_size=8, num_workers=1, res=32,
                           device=cpu)


def empty_beton(beton, out):
    """A valid .beton of 0 samples (ffcv's writer cannot make one): ``beton``'s header and field
    descriptions, with 0 samples and an empty allocation table."""
    from ffcv.types import FieldDescType, HeaderType
    header = np.fromfile(beton, dtype=HeaderType, count=1)
    end = HeaderType.itemsize + int(header['num_fields'][0]) * FieldDescType.itemsize
    header['num_samples'], header['alloc_table_ptr'] = 0, end
    out.write_bytes(header.tobytes() + beton.read_bytes()[HeaderType.itemsize:end])
    return out


def test_a_batch_larger_than_the_dataset_or_no_loader_thread_is_refused(sample_betons, tmp_path):
    from imagenet_ffcv import train
    from conftest import small_config
    from imagenet_ffcv.config import ConfigError
    with pytest.raises(ConfigError, match='more than the 340 images'):
        train.main(small_config(sample_betons, tmp_path, '--training.batch_size=512'))
    with pytest.raises(ConfigError, match='data.num_workers=0 must be >= 1'):
        small_config(sample_betons, tmp_path, '--data.num_workers=0')
    assert list(tmp_path.iterdir()) == []  # no run folder for a run that cannot start


def corrupt_copy(beton, out, index):
    """A copy of ``beton`` whose record ``index`` has an end-of-image marker written early in its
    entropy-coded data (bytes damaged in a copy): the JPEG still parses, but its data ends."""
    out.write_bytes(beton.read_bytes())
    ptr = int(verify.records(beton)['data_ptr'][index])
    data = bytearray(out.read_bytes())
    scan = data.index(b'\xff\xda', ptr)  # start of scan
    data[scan + 40:scan + 42] = b'\xff\xd9'
    out.write_bytes(bytes(data))
    return out


def test_a_corrupt_record_is_named_by_verify_validation_and_training(sample_betons, tmp_path):
    from torch import nn

    from imagenet_ffcv import engine
    from imagenet_ffcv.verify import verify_beton
    val = corrupt_copy(sample_betons['val'], tmp_path / 'val.beton', 7)
    assert [p for p in verify_beton(val)['problems'] if p.startswith('record 7:')]
    assert len(verify_beton(val)['problems']) == 1
    cpu = torch.device('cpu')
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(10))
    loader = loaders.val_loader(path=val, batch_size=16, num_workers=2, res=32, device=cpu)
    with pytest.raises(engine.CorruptRecordError, match=r'val.beton: sample 7 does not decode'):
        engine.evaluate(model=model, loader=loader, corrupt_record=loader.corrupt_record)
    # (Intact betons raise nothing: every training and validation test reads them this way.)

    train = corrupt_copy(sample_betons['train'], tmp_path / 'train.beton', 123)
    loader, _ = loaders.train_loader(path=train, batch_size=34, num_workers=2, res=32,
                                     os_cache=True, device=cpu, distributed=False, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(engine.CorruptRecordError, match=r'train.beton: sample 123 does not decode'):
        engine.train_one_epoch(model=model, loader=loader, optimizer=optimizer,
                               loss_fn=nn.CrossEntropyLoss(), lr_at=lambda t: 0.01, epoch=0,
                               show_progress=False,
                               hooks=engine.EpochHooks(corrupt_record=loader.corrupt_record))


def test_a_class_list_without_names_gets_the_ilsvrc_names_of_its_wnids(tmp_path):
    """A class list written by another tool (``index<TAB>wnid``, as a user makes one for an
    ffcv-imagenet .beton) made predict print 'n01440764 (score = ...)' for a wnid whose name this
    package holds; a name given wins, and a folder that is not a wnid stays nameless."""
    from imagenet_ffcv.classes import read_class_names
    path = tmp_path / 'train.classes.tsv'
    path.write_text('0\tn01440764\n1\tmy_dogs\n2\tn01443537\tgold\n')
    assert read_class_names(path) == [('n01440764', 'tench'), ('my_dogs', ''),
                                      ('n01443537', 'gold')]


def test_a_beton_with_other_fields_is_refused_naming_them_and_what_to_do(tmp_path):
    """A .beton written by one's own ffcv script with its fields in another order (label, then
    image) was refused as "fields ['label', 'image'], expected image and label", with no word of
    what to do; its fields, their types and the remedy are named."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from imagenet_ffcv.verify import CorruptBetonError, check_beton
    images = [(k, np.full((16, 16, 3), 40 * k, np.uint8)) for k in range(4)]
    path = tmp_path / 'own.beton'
    DatasetWriter(str(path), {'label': IntField(), 'image': RGBImageField()},
                  num_workers=1).from_indexed_dataset(images)
    with pytest.raises(CorruptBetonError) as info:
        check_beton(path)  # what the loaders, the trainer and --verify check first
    assert str(info.value) == (
        f'{path}: its fields are label (IntField), image (RGBImageField); this tool reads .beton '
        'files whose first fields are image (RGBImageField) and label (IntField), as '
        "imagenet-ffcv-write and ffcv-imagenet's write_imagenet.py write them: write this one "
        'again from its images with imagenet-ffcv-write')


def test_a_beton_path_this_user_may_not_look_at_is_named_with_its_key(monkeypatch):
    """A folder on the path without permission to look into it: the check raised PermissionError
    without the config key (tests run as root, which may look anywhere: stat is made to refuse)."""
    def refused(self, **kwargs):
        raise PermissionError(13, 'Permission denied', str(self))
    with monkeypatch.context() as patched:
        patched.setattr(Path, 'stat', refused)
        with pytest.raises(InputError) as info:
            verify.check_there('/data/locked/val.beton', 'data.val_dataset')
    assert str(info.value) == ('data.val_dataset=/data/locked/val.beton: Permission denied (this '
                               'user may not look into a folder on its path): let it (chmod '
                               'a+rX), or give another path')
