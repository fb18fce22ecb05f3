"""The fused decoders (imagenet_ffcv/decoders.py, image_decode.py): region decoding, resampling,
flip, normalisation, and the loaders built on them, against independent references (full decodes,
OpenCV)."""
import re

import cv2
import numpy as np
import pytest
import torch

from conftest import SAMPLE
from imagenet_ffcv import (constants, decoders, image_decode, images, jpeg_region, loaders,
                           memory_readers, resampling, sources, verify, writer)

MEAN, STD = constants.IMAGENET_MEAN, constants.IMAGENET_STD


def jpeg_bytes(a, quality=90):
    ok, buf = cv2.imencode('.jpg', cv2.cvtColor(a, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.reshape(-1)


@pytest.fixture(scope='module')
def photo():
    """A real 4:3 photo, 341 x 256 after the converter's resize, as uint8 RGB and as JPEG."""
    path = sorted((SAMPLE / 'train').glob('*/*.JPEG'))[0]
    a = cv2.resize(images.load_image(path, 256), (341, 256), interpolation=cv2.INTER_AREA)
    return a, jpeg_bytes(a)


@pytest.mark.parametrize('denom', [1, 2, 4])
def test_region_decode_equals_the_full_decode_inside_the_margin(photo, denom):
    _, jpeg = photo
    height, width = -(-256 // denom), -(-341 // denom)
    full, first = jpeg_region.decode_region(jpeg, top=0, left=0, height=height, width=width,
                                            denom=denom)
    assert first == 0 and full.shape == (height, width, 3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(8, height // 2), rng.integers(8, width // 2)
        top, left = rng.integers(0, height - h), rng.integers(0, width - w)
        part, first = jpeg_region.decode_region(jpeg, top=top, left=left, height=h, width=w,
                                                denom=denom)
        assert first <= left and first + part.shape[1] >= left + w
        m = image_decode.MARGIN
        inner = part[m:h - m, left - first + m:left - first + w - m]
        np.testing.assert_array_equal(inner, full[top + m:top + h - m, left + m:left + w - m])


def test_region_decode_names_bad_input(photo):
    _, jpeg = photo
    with pytest.raises(ValueError, match='outside the image'):
        jpeg_region.decode_region(jpeg, top=250, left=0, height=10, width=10)
    with pytest.raises(ValueError, match='corrupt'):
        jpeg_region.decode_region(np.frombuffer(b'not a jpeg at all' * 10, np.uint8), top=0,
                                  left=0, height=1, width=1)


@pytest.mark.parametrize('crop, size', [((10, 20, 200, 180), (160, 160)),   # shrink < 2
                                        ((0, 0, 256, 341), (192, 256)),     # whole image
                                        ((30, 40, 90, 100), (160, 160))])   # upscale
def test_resample_matches_opencv_bilinear_and_flips_and_normalises(photo, crop, size):
    a, _ = photo
    top, left, h, w = crop
    resample = resampling.resample
    out = np.empty((*size, 3), np.uint8)
    resample(a, float(top), float(left), float(h), float(w), out, False, MEAN.astype(np.float32),
             (1 / STD).astype(np.float32), False)
    ref = cv2.resize(a[top:top + h, left:left + w], size[::-1], interpolation=cv2.INTER_LINEAR)
    # OpenCV rounds its weights to 11 bits; on the border, where an upscale samples just outside
    # the crop, it repeats the crop's edge and we read the image beyond it.
    assert np.abs(out.astype(int) - ref.astype(int))[1:-1, 1:-1].max() <= 2
    flipped = np.empty_like(out)
    resample(a, float(top), float(left), float(h), float(w), flipped, True,
             MEAN.astype(np.float32), (1 / STD).astype(np.float32), False)
    np.testing.assert_array_equal(flipped, out[:, ::-1])
    normed = np.empty(out.shape, np.float32)
    resample(a, float(top), float(left), float(h), float(w), normed, False,
             MEAN.astype(np.float32), (1 / STD).astype(np.float32), True)
    # the uint8 output is rounded: up to half a grey level over the smallest std
    np.testing.assert_allclose(normed, (out.astype(np.float32) - MEAN) / STD, atol=0.51 / STD.min())


def test_resample_averages_big_shrinks(photo):
    """A shrink by an integer k >= 2 averages k x k pixels: OpenCV's INTER_AREA exactly."""
    a, _ = photo
    out = np.empty((64, 85, 3), np.uint8)
    resampling.resample(a, 0.0, 0.0, 256.0, 340.0, out, False, MEAN.astype(np.float32),
                        (1 / STD).astype(np.float32), False)
    ref = cv2.resize(a[:, :340], (85, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize('normalize', [True, False])
def test_the_decoders_resample_in_c_as_resampling_resample_does(photo, normalize):
    """The decoders run resample's common case (2 taps per axis) in jpeg_region.c: the same pixels
    as resampling.resample (float32: within rounding; uint8: the rounding of a few pixels one grey
    level apart) for random crops, both flips, enlarged and shrunk, one-pixel-wide sources and
    outputs; shrinks by 2 or more (more taps) go to resampling.resample itself."""
    a, _ = photo
    resample_image = image_decode.resampler()
    assert resample_image is not resampling.resample  # the C part is built
    mean, inv_std = image_decode.normalization(MEAN, STD)
    rng = np.random.default_rng(1)
    cases = [(a, (0.0, 0.0, 256.0, 341.0), (224, 224)), (a[:, :1], (0.0, 0.0, 256.0, 1.0), (5, 3)),
             (a, (10.0, 20.0, 30.0, 40.0), (1, 1)), (a, (0.0, 0.0, 256.0, 341.0), (64, 64))]
    for _ in range(40):
        h, w = rng.uniform(8, 256), rng.uniform(8, 341)
        crop = (rng.uniform(0, 256 - h), rng.uniform(0, 341 - w), h, w)
        cases.append((a, crop, tuple(int(v) for v in rng.integers(1, 300, 2))))
    for src, crop, size in cases:
        src = np.ascontiguousarray(src)
        for flip in (False, True):
            dtype = np.float32 if normalize else np.uint8
            expected, got = np.zeros((*size, 3), dtype), np.ones((*size, 3), dtype)
            resampling.resample(src, *crop, expected, flip, mean, inv_std, normalize, False)
            resample_image(src, *crop, got, flip, mean, inv_std, normalize, False)
            if normalize:
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
            else:
                differ = got != expected
                assert np.abs(got.astype(int) - expected).max() <= 1
                assert differ.mean() < 1e-3, (crop, size, differ.mean())


def test_dct_scale_leaves_a_shrink_below_two():
    assert [image_decode.dct_scale(s) for s in (0.5, 1.0, 1.99, 2.0, 3.9, 4.0, 8.5, 40)] == \
        [1, 1, 1, 2, 2, 4, 8, 8]


@pytest.fixture(scope='module')
def betons(tmp_path_factory):
    """Eight demo photos at shorter side 256, as JPEG (with restart markers, the default), as JPEG
    without markers (``jpg_no_markers``: the .beton files written before) and as raw pixels."""
    out = tmp_path_factory.mktemp('dec')
    classes = sources.find_classes(SAMPLE / 'train')
    samples = sources.list_samples(SAMPLE / 'train', classes)[::40][:8]
    paths = {}
    for name, mode, interval in (('jpg', 'jpg', images.DEFAULT_RESTART_INTERVAL),
                                 ('jpg_no_markers', 'jpg', 0), ('raw', 'raw', 0)):
        paths[name] = out / f'{name}.beton'
        writer.write_beton(samples, paths[name], max_res=256, write_mode=mode,
                           restart_interval=interval, num_workers=1)
    return paths


def stored_images(path):
    """The stored images of a beton decoded whole with ffcv's own decoder (uint8 HWC)."""
    from ffcv.libffcv import imdecode
    data = verify.file_bytes(path)
    images = []
    for r in verify.records(path):
        h, w, blob = int(r['height']), int(r['width']), verify.record_bytes(data, r)
        if r['mode'] == verify.JPEG_MODE:
            a = np.empty((h, w, 3), np.uint8)
            imdecode(blob, a, h, w, h, w, 0, 0, 1, 1, False, False)
        else:
            a = blob[:h * w * 3].reshape(h, w, 3)
        images.append(a)
    return images


@pytest.mark.parametrize('mode, res', [('jpg', 64), ('jpg', 224), ('raw', 64), ('raw', 224)])
def test_val_loader_is_the_centre_crop_of_the_stored_image(betons, mode, res):
    """Centre crop (224/256 of the shorter side), resized, normalised: against OpenCV on the
    stored image (bilinear below a shrink of 2, area above, where the loader decodes DCT-scaled)."""
    loader = loaders.val_loader(path=betons[mode], batch_size=4, num_workers=2, res=res,
                             device=torch.device('cpu'))
    got = torch.cat([x.clone() for x, _ in loader]).permute(0, 2, 3, 1).numpy()
    for a, x in zip(stored_images(betons[mode]), got):
        side = int(constants.DEFAULT_CROP_RATIO * min(a.shape[:2]))
        top, left = (a.shape[0] - side) // 2, (a.shape[1] - side) // 2
        interp = cv2.INTER_LINEAR if side < 2 * res else cv2.INTER_AREA
        ref = cv2.resize(a[top:top + side, left:left + side], (res, res), interpolation=interp)
        pixels = x * STD.astype(np.float32) + MEAN.astype(np.float32)
        # The loader samples the pixels just outside the crop where OpenCV repeats the crop's
        # edge: compare inside a 1-pixel border. DCT scaling (JPEG) and k x k sampling (raw) are
        # close to, not equal to, a box filter.
        diff = np.abs(pixels - ref)[1:-1, 1:-1]
        max_diff, mean_diff = (2.5, 0.6) if interp == cv2.INTER_LINEAR else (60, 6)
        assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max(), diff.mean())


def test_decode_crop_refuses_a_raw_record_too_short_for_its_image():
    """A raw record shorter than height x width x 3 bytes gives ValueError (the per-image C
    function returns image_decode.BAD_RECORD, since it cannot raise) instead of being read past
    its end; one with bytes to spare gives the pixels of its first height x width x 3."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    args = dict(height=6, width=8, crop=(1, 2, 4, 4), size=(4, 4), normalize=False,
                is_jpeg=False)
    exact = image_decode.decode_crop(pixels.reshape(-1), **args)
    np.testing.assert_array_equal(exact, pixels[1:5, 2:6])  # the crop at its own size
    longer = np.concatenate([pixels.reshape(-1), np.full(5, 255, np.uint8)])
    np.testing.assert_array_equal(image_decode.decode_crop(longer, **args), exact)
    with pytest.raises(ValueError, match='raw pixels too short for the image'):
        image_decode.decode_crop(pixels.reshape(-1)[:-1], **args)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_the_per_image_c_function_reports_an_error_inside_it_as_a_failed_decode():
    """Code inside the per-image C function that raises (here: taps of an image 0 px wide) makes
    it return 0, which the loaders and decode_crop take as a failed decode, not as
    image_decode.DECODED: the image would otherwise keep an earlier batch's pixels."""
    pixels = np.zeros(6 * 8 * 3, np.uint8)
    out, buf, info = np.zeros((4, 1, 3), np.uint8), np.zeros(6 * 8 * 3, np.uint8), np.zeros(2)
    mean, inv_std = image_decode.normalization(MEAN, STD)
    decode_image = image_decode.compiled_image_decoder(False).ctypes
    arguments = [pixels.ctypes.data, pixels.size, False, 6, 8, 1, 2, 4, 4, buf.ctypes.data,
                 buf.size, info.ctypes.data, out.ctypes.data, 4, 1, False, mean.ctypes.data,
                 inv_std.ctypes.data, False]
    assert decode_image(*arguments) == image_decode.DECODED
    arguments[14] = 0  # out_w: no column to resample, and taps' col_index.min() raises
    assert decode_image(*arguments) == 0 != image_decode.DECODED
    with pytest.raises(ValueError, match='each at least 1 px'):
        image_decode.decode_crop(pixels, height=6, width=8, crop=(1, 2, 4, 4), size=(4, 0),
                                 is_jpeg=False)


@pytest.mark.parametrize('mode', ['jpg', 'raw'])
def test_train_loader_rows_are_random_crop_pixels_of_their_records(betons, mode):
    """Each row of a training batch equals image_decode.random_crop_pixels of its record (the
    crop and flip of its seed, epoch and sample index), bit for bit, in the first and the second
    epoch: the loaders' batch loop and the one-record path give the same pixels."""
    loader, _ = loaders.train_loader(path=betons[mode], batch_size=4, num_workers=2, res=56,
                                     os_cache=True, device=torch.device('cpu'),
                                     distributed=False, seed=5)
    data, stored = verify.file_bytes(betons[mode]), verify.records(betons[mode])
    for epoch in (0, 1):
        order = loader.next_traversal_order()  # the sample indices the epoch's rows hold
        rows = torch.cat([x.clone() for x, _ in loader]).permute(0, 2, 3, 1).numpy()
        assert len(rows) == len(order) == 8
        for row, index in zip(rows, order):
            m = stored[index]
            want = image_decode.random_crop_pixels(
                verify.record_bytes(data, m), height=int(m['height']), width=int(m['width']),
                res=56, seed=5, epoch=epoch, index=int(index),
                is_jpeg=bool(m['mode'] == verify.JPEG_MODE))
            assert np.array_equal(row, want), (epoch, index)


def test_train_loader_whole_image_crops_flip_and_fallback_agree(betons, monkeypatch):
    """With min_crop_scale=1 a 4:3 image gives its central 4:3-clipped crop; flip_prob=1 mirrors
    it; the fallback (whole-image decode by ffcv, when the C part cannot be built) gives the
    same pixels as the region decoder."""
    def batch(flip_prob):
        loader, _ = loaders.train_loader(path=betons['jpg'], batch_size=8, num_workers=2, res=96,
                                      os_cache=True, device=torch.device('cpu'),
                                      distributed=False, seed=0, min_crop_scale=1.0,
                                      flip_prob=flip_prob)
        x, y = next(iter(loader))
        return x.clone(), y.clone()
    plain, labels = batch(0.0)
    flipped, labels_f = batch(1.0)
    order = torch.argsort(labels)  # same images, possibly another order
    assert torch.equal(labels[order], labels_f[torch.argsort(labels_f)])
    assert plain.is_contiguous(memory_format=torch.channels_last) and plain.dtype == torch.float32
    torch.testing.assert_close(flipped[torch.argsort(labels_f)], plain[order].flip(3))

    monkeypatch.setattr(jpeg_region, '_decode_region_c', False)  # as if the build had failed
    fallback, labels_b = batch(0.0)
    torch.testing.assert_close(fallback[torch.argsort(labels_b)], plain[order], atol=1e-5,
                               rtol=0)


def test_an_unbuilt_decoder_in_a_checkout_run_from_its_folder_says_so(tmp_path, monkeypatch):
    """After ``pip install .``, ``python -m imagenet_ffcv.train`` run from the checkout's folder
    imports the checkout's package (the current folder heads sys.path), which has no built
    decoder; the message says so, and only there."""
    package = tmp_path / 'checkout' / 'imagenet_ffcv'
    package.mkdir(parents=True)
    monkeypatch.setattr(jpeg_region, '__file__', str(package / 'jpeg_region.py'))
    monkeypatch.chdir(tmp_path / 'checkout')
    with pytest.raises(jpeg_region.JpegLibraryError) as info:
        jpeg_region.library_path()
    assert str(info.value).startswith(f'the JPEG region decoder is not built (no '
                                      f'_jpeg_region*.so in {package}); reinstall the package')
    assert str(info.value).endswith(f'; or, to use the package pip installed, run from another '
                                    f'folder than {package.parent}')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(jpeg_region.JpegLibraryError) as info:
        jpeg_region.library_path()
    assert 'run from another folder' not in str(info.value)


def defined_functions(ir: str) -> list:
    """The names of the functions that LLVM code ``ir`` defines (numba's mangled names)."""
    return re.findall(r'^define [^@]*@"?([^"(\s]+)', ir, re.M)


def test_loaders_share_one_batch_loop_compiled_once_per_process(betons, monkeypatch):
    """The loaders' work (decoders.batch_decoder's batch loop and the per-image
    image_decode.compiled_image_decoder it calls) is compiled at the first loader's first batch;
    later loaders with the same kind of data and reader, train or val, whatever their seed and
    decoders.PARALLEL_CHUNK, call the same compiled code with no new compilation (only their own
    small wrapper is compiled), and a loader made again gives the same batch. Loaders with one
    thread share the loop's serial version the same way. The batch loop calls the per-image C
    function by its address: none of its code (image_decode, resampling) is linked into the
    loop's, where LLVM would optimise it again."""
    monkeypatch.setattr(image_decode, '_compiled_decoders', {})  # as in a new process
    monkeypatch.setattr(decoders, '_batch_decoders', {})
    monkeypatch.setattr(memory_readers, '_readers', {})

    def first_batch(seed, os_cache, threads=2, chunk=decoders.PARALLEL_CHUNK):
        monkeypatch.setattr(decoders, 'PARALLEL_CHUNK', chunk)
        loader, _ = loaders.train_loader(path=betons['jpg'], batch_size=4, num_workers=threads,
                                         res=64, os_cache=os_cache, device=torch.device('cpu'),
                                         distributed=False, seed=seed)
        return next(iter(loader))[0].clone()

    def signatures():  # the per-image C functions made, and the batch loops' signatures
        return (set(image_decode._compiled_decoders),
                {key: list(f.signatures) for key, f in decoders._batch_decoders.items()})

    for os_cache in (False, True):  # ffcv's two memory managers
        first = first_batch(0, os_cache)
        compiled = signatures()
        assert len(decoders._batch_decoders) == 1 and len(image_decode._compiled_decoders) == 1
        assert not torch.equal(first_batch(1, os_cache), first)  # another seed: other crops
        assert torch.equal(first_batch(0, os_cache, chunk=3), first)
        assert torch.equal(first_batch(0, os_cache), first)
        assert signatures() == compiled
    [decode_batch] = decoders._batch_decoders.values()
    assert len(decode_batch.signatures) == 2  # one per reader
    [image_decoder] = image_decode._compiled_decoders.values()
    for signature in decode_batch.signatures:  # the per-image C function called, not linked in
        ir = decode_batch.inspect_llvm(signature)
        assert f'numba.dynamic.globals.{image_decoder.address:x}' in ir  # numba's name for it
        defined = defined_functions(ir)
        assert not [name for name in defined if 'image_decode' in name or 'resampling' in name]
    val = loaders.val_loader(path=betons['jpg'], batch_size=4, num_workers=2, res=64,
                             device=torch.device('cpu'))  # the centre crop, os_cache
    next(iter(val))
    assert signatures() == compiled

    assert torch.equal(first_batch(0, True, threads=1), first)  # the serial loop: compiled
    assert len(decoders._batch_decoders) == 2
    compiled = signatures()
    first_batch(1, True, threads=1)
    assert signatures() == compiled


def test_raw_and_jpeg_records_share_one_compile_of_the_resample():
    """The per-image C function gives resample_image the crop as floats for a raw record as for a
    JPEG, so that it (and resampling.taps and _taps, which it calls) is compiled into the C
    function once, not once per kind of record: 1.5-1.7 s less compiling per process and output
    dtype at numba level 0, 1.3-1.4 s at the default level (2-core VM). The pixels are the same
    (the tests above compare both kinds with OpenCV)."""
    ir = image_decode.compiled_image_decoder(False).inspect_llvm()
    defined = defined_functions(ir)
    for function in ('image_decode9resampler12_3clocals_3e14resample_image',
                     'resampling4taps', 'resampling5_taps'):  # numba's mangled names
        assert len([name for name in defined if function in name]) == 1, function


@pytest.mark.parametrize('center, ratio, seed, message', [
    (False, 1.0, 0, r'ratio=1.0: expected \(low, high\) aspect ratios'),
    (True, (0.75, 1.33), 0, r'ratio=\(0.75, 1.33\): expected a float for the centre crop'),
    (False, (0.75, 1.33), -1, r'seed=-1 must be >= 0 and < 2\*\*63'),
    (False, (0.75, 1.33), 2 ** 63, r'seed=9223372036854775808 must be >= 0 and < 2\*\*63')])
def test_a_decoder_refuses_a_ratio_of_the_other_crop_or_a_seed_out_of_range(center, ratio, seed,
                                                                            message):
    """The compiled crops would read past a ratio of the wrong length and cannot hold such a
    seed: the decoder refuses them when it is made, naming the value."""
    with pytest.raises(ValueError, match=message):
        decoders.CropResizeDecoder((64, 64), center=center, scale=(0.08, 1.0), ratio=ratio,
                                   flip_prob=0.5, normalize=True, mean=MEAN, std=STD, seed=seed)


def test_betons_with_and_without_restart_markers_load_to_the_same_batches(betons):
    """A .beton written before restart markers (``--restart-interval 0``) still loads, and its
    train and val batches equal those of the same images stored with markers, bit for bit: the
    markers change which bytes are decoded, not the pixels."""
    def batches(path):
        train, _ = loaders.train_loader(path=path, batch_size=4, num_workers=2, res=72,
                                        os_cache=True, device=torch.device('cpu'),
                                        distributed=False, seed=3)
        val = loaders.val_loader(path=path, batch_size=4, num_workers=2, res=72,
                                 device=torch.device('cpu'))
        return [(x.clone(), y.clone()) for loader in (train, val) for x, y in loader]
    with_markers, without = batches(betons['jpg']), batches(betons['jpg_no_markers'])
    assert len(with_markers) == len(without) == 4
    for (x, y), (x0, y0) in zip(with_markers, without):
        assert torch.equal(y, y0) and torch.equal(x, x0)


def test_normalize_on_device_keeps_channels_last():
    op = loaders.NormalizeOnDevice(MEAN, STD, torch.float16)
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    y = op.generate_code()(x, None)
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)
    ref = (x.float() - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-3, rtol=2e-3)


def test_antialiased_resample_is_closer_to_an_antialiased_reference_for_shrinks_below_two(photo):
    """data.decoder=fused_aa: for a shrink of 1.6 (where plain bilinear samples 1 of every 1.6
    pixels and aliases), 2 x 2 samples per output pixel come closer to a high-quality reference
    (PIL's LANCZOS resize of the same pixels) than plain bilinear does; for an enlargement both
    give the same pixels."""
    from PIL import Image
    a, _ = photo
    resample = resampling.resample
    stripes = a.copy()
    stripes[:, ::2] = 255 - stripes[:, ::2]  # high frequencies, where aliasing shows
    ref = np.asarray(Image.fromarray(stripes[:, :320]).resize((200, 160), Image.LANCZOS))
    errors = {}
    for antialias in (False, True):
        out = np.empty((160, 200, 3), np.uint8)
        resample(stripes, 0.0, 0.0, 256.0, 320.0, out, False, MEAN.astype(np.float32),
                 (1 / STD).astype(np.float32), False, antialias)
        errors[antialias] = np.abs(out.astype(int) - ref.astype(int)).mean()
    assert errors[True] < 0.7 * errors[False], errors
    up = [np.empty((300, 300, 3), np.uint8) for _ in range(2)]
    for out, antialias in zip(up, (False, True)):
        resample(a, 10.0, 20.0, 200.0, 200.0, out, False, MEAN.astype(np.float32),
                 (1 / STD).astype(np.float32), False, antialias)
    np.testing.assert_array_equal(up[0], up[1])


def test_the_decoder_choice_reaches_the_loaders(sample_betons):
    """data.decoder: 'fused_aa' builds our decoder with antialiasing on; 'ffcv' builds ffcv's
    stock pipeline (RandomResizedCropRGBImageDecoder, flip, NormalizeImage), whose batches have
    our layout: float32 (B, 3, res, res), channels_last, normalised; an unknown name is refused."""
    _, fused_aa = loaders.train_loader(path=sample_betons['train'], batch_size=16, num_workers=2,
                                       res=48, os_cache=True, device=torch.device('cpu'),
                                       distributed=False, seed=0, decoder_name='fused_aa')
    assert isinstance(fused_aa, decoders.CropResizeDecoder) and fused_aa.antialias
    loader, stock = loaders.train_loader(path=sample_betons['train'], batch_size=16,
                                         num_workers=2, res=48, os_cache=True,
                                         device=torch.device('cpu'), distributed=False, seed=0,
                                         decoder_name='ffcv')
    assert type(stock).__name__ == 'RandomResizedCropRGBImageDecoder'
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 48, 48) and x.dtype == torch.float32 and y.shape == (16,)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert abs(float(x.mean())) < 1.0 and 0.5 < float(x.std()) < 1.5  # normalised
    assert loader.corrupt_record() is None
    with pytest.raises(ValueError, match="decoder_name='bilinear'"):
        loaders.val_loader(path=sample_betons['val'], batch_size=8, num_workers=1, res=32,
                           device=torch.device('cpu'), decoder_name='bilinear')


# JPEGs with restart markers (images.encode_jpeg, the converter's records)
# ----------------------------------------------------------------------------------------------

def restart_markers(jpeg) -> list:
    """Offsets of the restart markers (0xFFD0 to 0xFFD7) after a JPEG's SOS segment, in order."""
    data = bytes(jpeg)
    sos = data.index(b'\xff\xda')
    scan = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], 'big')
    return [scan + m.start() for m in re.finditer(rb'\xff[\xd0-\xd7]', data[scan:])]


def encode_rst(a, interval, sampling=None):
    """JPEG q90 of a (H, W, 3) RGB or (H, W) grey array with OpenCV, a restart marker every
    ``interval`` MCUs (0: none), chroma ``sampling`` (an OpenCV IMWRITE_JPEG_SAMPLING_FACTOR_*;
    None: OpenCV's 4:2:0)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_RST_INTERVAL, interval]
    if sampling is not None:
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
    ok, buf = cv2.imencode('.jpg', a if a.ndim == 2 else cv2.cvtColor(a, cv2.COLOR_RGB2BGR),
                           params)
    assert ok
    return buf.reshape(-1)


def rectangles(height, width, n, seed):
    """``n`` random (top, left, rows, cols) inside a height x width image, after the whole image
    and the four one-pixel corners (each touching two edges)."""
    rng = np.random.default_rng(seed)
    out = [(0, 0, height, width), (0, 0, 1, 1), (0, width - 1, 1, 1), (height - 1, 0, 1, 1),
           (height - 1, width - 1, 1, 1)]
    for _ in range(n):
        rows, cols = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        out.append((int(rng.integers(0, height - rows + 1)), int(rng.integers(0, width - cols + 1)),
                    rows, cols))
    return out


CASES = {  # name -> (pixels from the photo, encoder(pixels, interval), intervals in MCUs)
    # the converter's records: 341 px = 22 MCU columns: intervals of 2 (the default), 1, and one
    # of whole rows
    'stored 4:2:0': (lambda a: a, lambda a, n: images.encode_jpeg(a, quality=90,
                                                                  restart_interval=n),
                     [images.DEFAULT_RESTART_INTERVAL, 1, 22]),
    # intervals that do not divide a row (3, 7 MCUs: rows from where an interval starts), one of
    # several rows (40); a size that is no multiple of the MCU
    'odd 4:2:0': (lambda a: a[3:250, 5:338], encode_rst, [3, 7, 40]),
    '4:4:4': (lambda a: a[:201, :97], lambda a, n: encode_rst(
        a, n, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444), [1, 4, 5]),
    '4:2:2': (lambda a: a[:99, :250], lambda a, n: encode_rst(
        a, n, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422), [1, 2, 16]),
    'grey': (lambda a: np.ascontiguousarray(a[:173, :203, 1]), encode_rst, [1, 2, 13])}


@pytest.mark.parametrize('case', list(CASES))
def test_a_region_decoded_through_restart_markers_equals_todays_region_decode(photo, case):
    """jpeg_region.c's marker way gives, bit for bit, the pixels and first column of libjpeg's
    partial decompression of the same JPEG and of the JPEG of the same pixels without markers,
    for rectangles anywhere (the whole image, each corner, random ones) at every DCT scale."""
    make, encode, intervals = CASES[case]
    a = make(photo[0])
    plain = encode(a, 0)
    assert not restart_markers(plain)
    for n in intervals:
        jpeg = encode(a, n)
        assert restart_markers(jpeg)
        for denom in (1, 2, 4, 8):
            height, width = -(-a.shape[0] // denom), -(-a.shape[1] // denom)
            for top, left, rows, cols in rectangles(height, width, 25, seed=n * 10 + denom):
                window = dict(top=top, left=left, height=rows, width=cols, denom=denom)
                got, first = jpeg_region.decode_region(jpeg, **window)
                scanned, scanned_first = jpeg_region.decode_region(jpeg, restart_markers=False,
                                                                   **window)
                plain_pixels, plain_first = jpeg_region.decode_region(plain, **window)
                assert first == scanned_first == plain_first, (n, window)
                np.testing.assert_array_equal(got, scanned, err_msg=str((n, window)))
                np.testing.assert_array_equal(got, plain_pixels, err_msg=str((n, window)))


def test_restart_markers_change_no_decoded_pixel(photo):
    """The records stay standard JPEGs: ffcv's own decoder, OpenCV and Pillow decode a record
    with markers to the pixels of the record without them."""
    import io

    from ffcv.libffcv import imdecode
    from PIL import Image
    a, _ = photo
    decoded = []
    for n in (0, images.DEFAULT_RESTART_INTERVAL):
        jpeg = images.encode_jpeg(a, quality=90, restart_interval=n)
        ffcv_pixels = np.empty_like(a)
        imdecode(jpeg, ffcv_pixels, *a.shape[:2], *a.shape[:2], 0, 0, 1, 1, False, False)
        decoded.append([ffcv_pixels, cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[:, :, ::-1],
                        np.asarray(Image.open(io.BytesIO(jpeg.tobytes())).convert('RGB'))])
    for without, with_markers in zip(*decoded):
        np.testing.assert_array_equal(without, with_markers)
    assert np.abs(decoded[1][0].astype(int) - a).mean() < 3  # and they are the photo


def without_intervals(jpeg, intervals):
    """``jpeg`` with the data of the given restart intervals (numbered from 0) removed, their
    markers kept: libjpeg finds each of them empty, corrupt data."""
    data = bytearray(jpeg)
    markers = restart_markers(jpeg)
    sos = data.index(b'\xff\xda')
    scan = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], 'big')
    for k in sorted(intervals, reverse=True):  # interval k: after marker k - 1, up to marker k
        del data[markers[k - 1] + 2 if k else scan:markers[k]]
    return np.frombuffer(bytes(data), np.uint8)


def test_the_marker_way_reads_only_the_intervals_a_region_covers(photo):
    """Damage in MCU row 0, and left of a region in the region's own rows: the marker way never
    reads it and decodes the region as from the intact JPEG; libjpeg's partial decompression
    entropy-decodes both and reports the corrupt data."""
    a, _ = photo
    jpeg = images.encode_jpeg(a, quality=90, restart_interval=images.DEFAULT_RESTART_INTERVAL)
    n = images.restart_interval_for(a.shape[1], images.DEFAULT_RESTART_INTERVAL)
    per_row = 22 // n  # intervals in an MCU row of the 341 px photo
    damaged = without_intervals(jpeg, [0, 8 * per_row])  # rows 0 and 8, their first columns
    window = dict(top=8 * 16 + 5, left=12 * 16 + 3, height=100, width=120)  # MCU columns 12-19
    got, first = jpeg_region.decode_region(damaged, **window)
    intact, intact_first = jpeg_region.decode_region(jpeg, **window)
    assert first == intact_first
    np.testing.assert_array_equal(got, intact)
    with pytest.raises(ValueError, match='corrupt'):
        jpeg_region.decode_region(damaged, restart_markers=False, **window)


def damaged_markers(jpeg) -> dict:
    """Copies of a JPEG with restart markers whose markers are damaged or missing."""
    data = bytes(jpeg)
    markers = restart_markers(jpeg)
    renumbered = bytearray(data)
    renumbered[markers[30] + 1] = 0xD0 + (30 + 1) % 8
    stripped = bytearray(data)
    for m in reversed(markers):
        del stripped[m:m + 2]
    dri = data.index(b'\xff\xdd')
    return {'one marker renumbered': bytes(renumbered), 'markers removed': bytes(stripped),
            'DRI segment removed': data[:dri] + data[dri + 6:],
            'data cut at marker 40': data[:markers[40]] + b'\xff\xd9'}


def test_damaged_or_missing_restart_markers_are_reported_never_decoded_wrong(photo):
    """A JPEG whose markers are not where its headers say is decoded the other way, where
    libjpeg reports the damage: a ValueError, never pixels decoded from the wrong intervals."""
    a, _ = photo
    jpeg = images.encode_jpeg(a, quality=90, restart_interval=images.DEFAULT_RESTART_INTERVAL)
    for name, damaged in damaged_markers(jpeg).items():
        damaged = np.frombuffer(damaged, np.uint8)
        for window in (dict(top=120, left=100, height=100, width=100),  # below the damage
                       dict(top=0, left=0, height=256, width=341)):
            with pytest.raises(ValueError, match='corrupt|ended early'):
                jpeg_region.decode_region(damaged, **window)
                pytest.fail(f'{name}: decoded {window}')


def test_damaged_huffman_data_in_a_region_is_judged_as_libjpeg_judges_it(photo):
    """The marker way decodes the Huffman data of the intervals it reads with jpeg_region.c's own
    decoder. One byte of those intervals changed at random (400 times): either both it and
    libjpeg's partial decompression refuse the JPEG, or both decode it to the same pixels."""
    a, _ = photo
    jpeg = images.encode_jpeg(a, quality=90, restart_interval=images.DEFAULT_RESTART_INTERVAL)
    n = images.restart_interval_for(a.shape[1], images.DEFAULT_RESTART_INTERVAL)
    per_row = 22 // n  # intervals in an MCU row of the 341 px photo
    markers = restart_markers(jpeg)
    window = dict(top=5 * 16 + 5, left=6 * 16 + 3, height=90, width=120)  # MCU rows 5-10, cols 6-13
    covered = [(markers[k - 1] + 2, markers[k]) for row in range(5, 11)
               for k in range(row * per_row + 6 // n, row * per_row + 13 // n + 1)]
    rng = np.random.default_rng(0)
    outcomes = {'both refuse': 0, 'same pixels': 0}
    for _ in range(400):
        start, end = covered[rng.integers(len(covered))]
        damaged = jpeg.copy()
        at = int(rng.integers(start, end))
        damaged[at] ^= np.uint8(rng.integers(1, 256))
        try:
            got = jpeg_region.decode_region(damaged, **window)
        except ValueError:
            got = None
        try:
            libjpeg = jpeg_region.decode_region(damaged, restart_markers=False, **window)
        except ValueError:
            libjpeg = None
        assert (got is None) == (libjpeg is None), at
        if got is None:
            outcomes['both refuse'] += 1
        else:
            assert got[1] == libjpeg[1]
            np.testing.assert_array_equal(got[0], libjpeg[0], err_msg=str(at))
            outcomes['same pixels'] += 1
    assert min(outcomes.values()) >= 40, outcomes  # both cases were seen


def test_a_record_with_damaged_markers_is_named_by_verify_and_the_loader(betons, tmp_path):
    """The record's index, from imagenet-ffcv-write --verify and from the loader."""
    from ffcv.reader import Reader

    from imagenet_ffcv import verify
    reader = Reader(str(betons['jpg']))
    ptr = int(reader.metadata['f0']['data_ptr'][3])
    size = int(reader.alloc_table['size'][reader.alloc_table['ptr'] == ptr][0])
    data = bytearray(betons['jpg'].read_bytes())
    record = bytes(data[ptr:ptr + size])
    marker = restart_markers(record)[5]
    data[ptr + marker + 1] ^= 1  # RST5 -> RST4: the record's length stays
    damaged = tmp_path / 'damaged.beton'
    damaged.write_bytes(bytes(data))
    problems = verify.verify_beton(damaged)['problems']
    assert len(problems) == 1 and problems[0].startswith('record 3: JPEG does not decode')
    loader = loaders.val_loader(path=damaged, batch_size=8, num_workers=1, res=64,
                                device=torch.device('cpu'))
    for _ in loader:
        pass
    assert 'sample 3 does not decode' in loader.corrupt_record()


RESAMPLE_IN_A_NEW_PROCESS = '''
import json
import sys
import numpy as np
if sys.argv[1] == 'no cache folder':  # as on a machine where no cache folder can be written
    from numba.core import caching
    caching.CacheImpl._locator_classes = []
from imagenet_ffcv import resampling
src = np.arange(9 * 11 * 3, dtype=np.uint8).reshape(9, 11, 3)
mean, inv_std = np.full(3, 100, np.float32), np.full(3, 0.5, np.float32)
sums = []
for dtype, normalize in ((np.float32, True), (np.uint8, False)):
    out = np.zeros((4, 5, 3), dtype)
    resampling.resample(src, 0.5, 1.0, 8.0, 9.0, out, True, mean, inv_std, normalize, False)
    sums.append(float(out.astype(np.float64).sum()))
sums.append(float(resampling.taps(9, 11, 0.5, 1.0, 8.0, 9.0, 4, 5, True, False)[3].sum()))
print(json.dumps([sums] + [[sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values()),
                             f.stats.cache_path] for f in (resampling.resample, resampling.taps)]))
'''


@pytest.mark.slow
def test_resample_is_compiled_once_per_machine_and_runs_without_a_cache_folder(tmp_path):
    """resampling.resample is cached on disk: a second process loads both of its compilations
    (float32 and uint8 output) instead of compiling them, and the one of resampling.taps (which
    resample and the decoders call). Where no cache folder can be written
    (numba raises RuntimeError when the function is defined) it still imports, compiled per
    process, with the same output. numba cannot cache it at NUMBA_OPT=0 (the tests' level), so
    these processes run at numba's default level, as training does."""
    import json
    import subprocess
    import sys
    from conftest import run_env
    env = {k: v for k, v in run_env().items() if k != 'NUMBA_OPT'}
    env['NUMBA_CACHE_DIR'] = str(tmp_path / 'numba')

    def run(mode):
        out = subprocess.run([sys.executable, '-c', RESAMPLE_IN_A_NEW_PROCESS, mode], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        # (sums, [cache hits, cache misses, cache folder] of resample, the same of taps)
        return json.loads(out.stdout)

    first, second, uncached = run('cache'), run('cache'), run('no cache folder')
    assert first[1][:2] == [0, 2] and str(tmp_path / 'numba') in first[1][2]
    assert first[2][:2] == [0, 1] and str(tmp_path / 'numba') in first[2][2]
    assert second[1][:2] == [2, 0] and second[2][:2] == [1, 0]
    assert uncached[1:] == [[0, 2, None], [0, 1, None]]
    assert first[0] == second[0] == uncached[0]
