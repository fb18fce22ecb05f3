"""Image quality of the three training decoders (``data.decoder``): how close each one's uint8
output is to a high-quality resize of the same crop rectangle.

For every image, stored as ``imagenet-ffcv-write`` stores it by default (shorter side 256 with
``images.load_image``, JPEG q90 with restart markers by ``images.encode_jpeg``), and
for the same random-resized crop rectangles (``crops.random_resized_crop``, scale (0.08, 1), ratio
(3/4, 4/3), keys ``crops.sample_key(seed, crop number, image number)``), at 160, 192 and 224 px:

- reference: PIL's full decode of the stored JPEG, ``Image.resize((res, res), Image.LANCZOS,
  box=(left, top, right, bottom))`` (exact rectangle, ``reducing_gap`` off);
- ``fused``: ``image_decode.decode_crop``, the compiled steps ``decoders.CropResizeDecoder`` runs
  (``jpeg_window`` (partial), the region decode of the window, ``resample(antialias=False)``);
- ``fused_aa``: the same with ``antialias=True``;
- ``ffcv``: ffcv 1.0.2's ``RandomResizedCropRGBImageDecoder`` for the same rectangle, through
  ffcv's own native functions: ``libffcv.imdecode`` of the whole JPEG at full size (scale 1/1,
  libjpeg-turbo with TJFLAG_FASTDCT), then ``libffcv.resize_crop`` (OpenCV ``cv::resize`` of the
  integer rectangle with INTER_AREA; checked here against ``cv2.resize(..., INTER_AREA)``).

Metrics against the reference, averaged over the crops: mean absolute difference (0-255 units) and
PSNR (dB, per crop then averaged), overall and split by shrink = max(crop h, crop w) / res
(< 1: both axes enlarged, where fused and fused_aa coincide; 1-2; >= 2). Twice: against the
reference above, and against LANCZOS of the fast-DCT decode all three decoders start from ("same
decode": the resampling's error alone; PIL decodes with the accurate integer DCT). Also the MAD
between each of our decoders and ffcv's output.

    python benchmarks/decoder_quality.py          # about 30 s on 2 cores

Data: ../shared/data/imagewoof320 (train + val, 160 JPEGs) when present, else the embedded demo
sample (with a note). Prints a Markdown table; writes bench-results/decoder_quality.csv.
"""
import argparse
import io
import math
import time

import cv2
import numpy as np
from PIL import Image

from common import RESULTS, STORAGE, image_sets, machine_line, markdown_table, write_csv
from ffcv.libffcv import imdecode, resize_crop
from imagenet_ffcv import image_decode
from imagenet_ffcv.constants import DECODERS
from imagenet_ffcv.crops import random_resized_crop, sample_key
from imagenet_ffcv.images import DEFAULT_RESTART_INTERVAL, encode_jpeg, load_image
from imagenet_ffcv.sources import find_classes, list_samples

RESOLUTIONS = (160, 192, 224)
SCALE = np.array((0.08, 1.0))
RATIO = np.array((3 / 4, 4 / 3))
MAX_RES, QUALITY = STORAGE['max_res'], STORAGE['jpeg_quality']  # imagenet-ffcv-write's defaults
RANGES = (('< 1', 0.0, 1.0), ('1-2', 1.0, 2.0), ('>= 2', 2.0, math.inf))


def stored_jpegs(root, limit: int) -> list:
    """The images of root/train and root/val as imagenet-ffcv-write stores them: JPEG bytes
    (uint8)."""
    classes = find_classes(root / 'train')
    paths = [p for split in ('train', 'val') if (root / split).is_dir()
             for p, _ in list_samples(root / split, classes)]
    return [encode_jpeg(load_image(p, MAX_RES), quality=QUALITY,
                        restart_interval=DEFAULT_RESTART_INTERVAL)
            for p in paths[:limit]]


def fused(jpeg, height, width, crop, res, antialias):
    """Our decoder's output for one crop (no flip, uint8): ``image_decode.decode_crop``, the
    loaders' own compiled steps."""
    return image_decode.decode_crop(jpeg, height=height, width=width, crop=crop,
                                    size=(res, res), normalize=False, antialias=antialias)


def ffcv_stock(jpeg, height, width, crop, res):
    """ffcv 1.0.2's RandomResizedCropRGBImageDecoder for the rectangle ``crop``: its own calls."""
    i, j, h, w = crop
    full = np.empty((height, width, 3), np.uint8)
    imdecode(jpeg, full, height, width, height, width, 0, 0, 1, 1, False, False)
    dst = np.empty((res, res, 3), np.uint8)
    resize_crop(full, i, i + h, j, j + w, dst)
    return dst, full


def compare(out, ref) -> tuple:
    """(mean absolute difference, PSNR dB) of two uint8 images."""
    d = out.astype(np.float64) - ref
    mse = float(np.mean(d * d))
    return float(np.mean(np.abs(d))), 10 * math.log10(255 ** 2 / mse) if mse > 0 else 99.0


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--crops', type=int, default=4, help='crops per image and resolution')
    p.add_argument('--max-images', type=int, default=160)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    (name, root), = image_sets(['imagewoof320']).items()
    jpegs = stored_jpegs(root, args.max_images)
    results, decode_mad, area_mismatch = measure(jpegs, args.crops, args.seed)
    rows = summary_rows(results)
    seconds = time.perf_counter() - start
    print(f'{machine_line()}\n{name}: {len(jpegs)} images stored as imagenet-ffcv-write does '
          f'(shorter side {MAX_RES}, JPEG q{QUALITY}), {args.crops} random-resized crops each '
          f'(seed {args.seed}); reference: PIL LANCZOS of the crop from the full decode; shrink = '
          f'max(crop h, w) / res; {seconds:.0f} s\n')
    print(markdown_table(rows, [('decoder', 'decoder', ''), ('res', 'res', ''),
                                ('shrink', 'shrink', ''), ('crops', 'crops', ''),
                                ('mad', 'MAD', '.2f'), ('psnr_db', 'PSNR dB', '.2f'),
                                ('mad_same_decode', 'MAD, same decode', '.2f'),
                                ('psnr_same_decode', 'PSNR dB, same decode', '.2f'),
                                ('mad_vs_ffcv', 'MAD vs ffcv', '.2f')]))
    print(f'\nsame decode: the reference resized from the fast-DCT decode the decoders start '
          f'from (resampling error only); the two decodes differ by MAD '
          f'{np.mean(decode_mad):.2f} on the whole image')
    print(f'\nffcv resize_crop vs cv2.resize INTER_AREA: {area_mismatch} differing values')
    write_csv(RESULTS / 'decoder_quality.csv', rows)
    print(f'wrote {RESULTS / "decoder_quality.csv"}')


def measure(jpegs, crops: int, seed: int) -> tuple:
    """Every decoder's output for ``crops`` random-resized crops of each JPEG at each resolution,
    against the references: ``(results, decode_mad, area_mismatch)``, results as tuples (decoder,
    res, shrink, MAD, PSNR, MAD and PSNR against the fast-DCT reference, MAD against ffcv);
    decode_mad per image, the fast-DCT decode against PIL's (MAD); area_mismatch, the values where
    ffcv's resize_crop differs from cv2.resize INTER_AREA."""
    results, decode_mad, area_mismatch = [], [], 0
    for n, jpeg in enumerate(jpegs):
        with Image.open(io.BytesIO(jpeg.tobytes())) as im:
            ref_image = im.convert('RGB')
        width, height = ref_image.size
        # The same JPEG decoded as the decoders decode it (libjpeg-turbo, fast DCT)
        fast = np.empty((height, width, 3), np.uint8)
        imdecode(jpeg, fast, height, width, height, width, 0, 0, 1, 1, False, False)
        fast_image = Image.fromarray(fast)
        decode_mad.append(compare(fast, np.asarray(ref_image, np.float64))[0])
        for c in range(crops):
            crop = random_resized_crop(height, width, SCALE, RATIO,
                                       np.uint64(sample_key(seed, c, n)))
            i, j, h, w = crop
            for res in RESOLUTIONS:
                box = (j, i, j + w, i + h)
                ref = np.asarray(ref_image.resize((res, res), Image.LANCZOS, box=box), np.float64)
                stock, full = ffcv_stock(jpeg, height, width, crop, res)
                ref_fast = np.asarray(fast_image.resize((res, res), Image.LANCZOS, box=box),
                                      np.float64)
                area = cv2.resize(full[i:i + h, j:j + w], (res, res),
                                  interpolation=cv2.INTER_AREA)
                area_mismatch += int(np.count_nonzero(area != stock))
                outs = {'fused': fused(jpeg, height, width, crop, res, False),
                        'fused_aa': fused(jpeg, height, width, crop, res, True),
                        'ffcv': stock}
                for decoder in DECODERS:
                    results.append((decoder, res, max(h, w) / res, *compare(outs[decoder], ref),
                                    *compare(outs[decoder], ref_fast),
                                    compare(outs[decoder], stock.astype(np.float64))[0]))
    return results, decode_mad, area_mismatch


def summary_rows(results) -> list:
    """Per decoder, resolution and shrink range (and all crops): the mean of each metric."""
    rows = []
    for decoder in DECODERS:
        for res in RESOLUTIONS:
            for label, lo, hi in (('all', 0.0, math.inf),) + RANGES:
                sel = [r for r in results if r[0] == decoder and r[1] == res and lo <= r[2] < hi]
                if not sel:
                    continue
                mean = [float(np.mean([r[k] for r in sel])) for k in range(3, 8)]
                rows.append({'decoder': decoder, 'res': res, 'shrink': label, 'crops': len(sel),
                             'mad': round(mean[0], 3), 'psnr_db': round(mean[1], 2),
                             'mad_same_decode': round(mean[2], 3),
                             'psnr_same_decode': round(mean[3], 2),
                             'mad_vs_ffcv': round(mean[4], 3) if decoder != 'ffcv' else None})
    return rows


if __name__ == '__main__':
    main()
