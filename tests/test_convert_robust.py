"""The converter on bad and unusual inputs: odd colour modes, undecodable files (skipped or
--strict), --verify, the free-space check, and a kill -9 in the middle of a write."""
import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from conftest import PYTHON, REPO, SAMPLE, dead_pid, run_env
from imagenet_ffcv import (beton_out, betons, constants, errors, files, holdout, ilsvrc, images,
                           jpeg_region, sources, verify, write, writer)
from imagenet_ffcv import classes as classes_module
from imagenet_ffcv.classes import class_list_path, write_class_list


def sample_images(n):
    return sorted((SAMPLE / 'train').glob('*/*.JPEG'))[:n]


def photo(size, i=0):
    return Image.open(sample_images(i + 1)[i]).convert('RGB').resize(size)


def stored_raw_images(path):
    """Every image of a raw-mode .beton as stored, read with ``verify.records`` (no ffcv loader):
    [(H, W, 3)], labels."""
    data = verify.file_bytes(path)
    images = []
    for rec in verify.records(path):
        assert rec['mode'] == verify.RAW_MODE
        h, w = int(rec['height']), int(rec['width'])
        images.append(verify.record_bytes(data, rec)[:3 * w * h].reshape(h, w, 3))
    return images, verify.records(path)['label'].tolist()


def make_unusual(folder):
    """Decodable but unusual files; returns {name: expected (H, W, 3) uint8 at full size}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    # CMYK JPEG: must equal PIL's own RGB conversion of the same file
    photo((60, 40), 0).convert('CMYK').save(folder / 'cmyk.JPEG', quality=95)
    expected['cmyk.JPEG'] = np.asarray(Image.open(folder / 'cmyk.JPEG').convert('RGB'))
    # grayscale JPEG
    photo((50, 70), 1).convert('L').save(folder / 'gray.JPEG', quality=95)
    g = np.asarray(Image.open(folder / 'gray.JPEG'))
    expected['gray.JPEG'] = np.repeat(g[..., None], 3, axis=2)
    # palette PNG (with a transparent index) and RGBA PNG, both named .JPEG as in ImageNet
    pal = photo((40, 30), 2).convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info['transparency'] = 0
    pal.save(folder / 'palette.JPEG', format='PNG', transparency=0)
    expected['palette.JPEG'] = np.asarray(Image.open(folder / 'palette.JPEG').convert('RGB'))
    rgba = photo((30, 30), 3).convert('RGBA')
    rgba.putalpha(Image.linear_gradient('L').resize((30, 30)))
    rgba.save(folder / 'alpha.png')
    expected['alpha.png'] = np.asarray(rgba.convert('RGB'))
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): 40x20 stored -> 20x40 shown
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / 'rotated.JPEG', quality=100, exif=exif)
    expected['rotated.JPEG'] = np.asarray(ImageOps.exif_transpose(
        Image.open(folder / 'rotated.JPEG')).convert('RGB'))
    # 16-bit grayscale PNG: a full 0..65535 ramp must become 0..255, not be clipped to 255
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(folder / 'deep.png')
    expected['deep.png'] = np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=2)
    # 32-bit integer TIFFs (PIL mode 'I', depth unknown) holding 8-bit and 16-bit data: the first
    # as it is (>> 8 made it black), the second >> 8
    Image.fromarray((ramp >> 8).astype(np.int32)).save(folder / 'int32_8bit.tif')
    assert Image.open(folder / 'int32_8bit.tif').mode == 'I'
    expected['int32_8bit.tif'] = expected['deep.png']
    Image.fromarray(ramp.astype(np.int32)).save(folder / 'int32_16bit.tif')
    expected['int32_16bit.tif'] = expected['deep.png']
    # a very small image
    photo((20, 20), 4).save(folder / 'tiny.JPEG', quality=95)
    expected['tiny.JPEG'] = np.asarray(Image.open(folder / 'tiny.JPEG').convert('RGB'))
    # a JPEG whole but for its final EOI marker (PIL alone refuses it as truncated), and one with
    # bytes after its data before the EOI (libjpeg: 'extraneous bytes before marker 0xd9')
    whole = (folder / 'tiny.JPEG').read_bytes()
    assert whole.endswith(b'\xff\xd9')
    (folder / 'no_eoi.JPEG').write_bytes(whole[:-2])
    expected['no_eoi.JPEG'] = expected['tiny.JPEG']
    (folder / 'extra_bytes.JPEG').write_bytes(whole[:-2] + b'\x00\x12\x34\xff\xd9')
    expected['extra_bytes.JPEG'] = expected['tiny.JPEG']
    return expected


def make_bad(folder, good_jpeg):
    """Undecodable files; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = good_jpeg.read_bytes()
    (folder / 'truncated.JPEG').write_bytes(raw[:len(raw) // 2])
    # cut, then ended with an EOI marker: PIL decodes it without a word, the rest grey
    (folder / 'damaged.JPEG').write_bytes(raw[:len(raw) // 2] + b'\xff\xd9')
    (folder / 'zero.JPEG').write_bytes(b'')
    (folder / 'notes.jpg').write_text('not an image\n')
    names = {'truncated.JPEG', 'damaged.JPEG', 'zero.JPEG', 'notes.jpg'}
    if os.geteuid() != 0:  # root reads a chmod 000 file anyway
        locked = folder / 'locked.JPEG'
        locked.write_bytes(raw)
        locked.chmod(0)
        names.add('locked.JPEG')
    return names


def test_unusual_files_decode_to_correct_rgb(tmp_path):
    expected = make_unusual(tmp_path)
    for name, ref in expected.items():
        got = images.load_image(tmp_path / name, max_res=1000)
        assert got.dtype == np.uint8 and got.shape == ref.shape, name
        assert np.array_equal(got, ref), name
    rotated = images.load_image(tmp_path / 'rotated.JPEG', max_res=1000)
    assert rotated.shape == (40, 20, 3)  # portrait after the EXIF rotation
    assert rotated[2, 10, 0] > 200 and rotated[2, 10, 2] < 60   # top: red (was left)
    assert rotated[37, 10, 2] > 200 and rotated[37, 10, 0] < 60  # bottom: blue (was right)
    deep = images.load_image(tmp_path / 'deep.png', max_res=1000)
    assert deep[0, 0, 0] == 0 and deep[0, -1, 0] == 255 and deep[0, 32, 0] == 130
    assert len(np.unique(deep)) == 64  # PIL's convert('RGB') would leave mostly 255s
    # EXIF rotation is applied before the shorter-side resize
    assert images.load_image(tmp_path / 'rotated.JPEG', max_res=10).shape == (20, 10, 3)


def test_a_jpeg_decoded_at_a_reduced_scale_is_stored_at_the_size_of_its_own_pixels(tmp_path):
    """A 3550 x 563 px JPEG is decoded at half scale (PIL's draft), which libjpeg rounds up to
    1775 x 282; the size was worked out from that, 1611 x 256, where the same pixels as a PNG
    (no draft) gave 1614 x 256. Both now give 1614 x 256, turned by the EXIF orientation too."""
    pixels = np.random.default_rng(0).integers(0, 256, (563, 3550, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / 'wide.JPEG', quality=90)
    Image.fromarray(pixels).save(tmp_path / 'wide.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees: 563 x 3550
    Image.fromarray(pixels).save(tmp_path / 'turned.JPEG', quality=90, exif=exif)
    with Image.open(tmp_path / 'wide.JPEG') as im:
        im.draft('RGB', (1614, 256))
        assert im.size == (1775, 282)  # half scale, rounded up
    for name, shape in (('wide.JPEG', (256, 1614, 3)), ('wide.png', (256, 1614, 3)),
                        ('turned.JPEG', (1614, 256, 3))):
        assert images.load_image(tmp_path / name, max_res=256).shape == shape, name


def test_a_jpeg_over_pils_pixel_limit_is_read_and_a_png_is_refused_by_its_decoded_size(
        tmp_path, monkeypatch):
    """PIL refuses a file of more than twice ``Image.MAX_IMAGE_PIXELS`` (179 MP: a 200 MP phone
    photo) at the open, as a possible decompression bomb, and warns above it: the converter
    skipped such photos as undecodable and predict stopped with a traceback. A JPEG is decoded
    at 1/8 of its size, so the limit now applies to the pixels decoded: the JPEG is read with
    no warning, and a PNG that large is a ValueError naming its size. (The limit is lowered to
    25,000 px here, so that 300 x 200 px stands for 200 MP.)"""
    for suffix in ('jpg', 'png'):
        photo((300, 200)).save(tmp_path / f'big.{suffix}')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 25_000)
    with pytest.raises(Image.DecompressionBombError):  # PIL's own open, as before
        Image.open(tmp_path / 'big.jpg')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no DecompressionBombWarning either
        assert images.load_image(tmp_path / 'big.jpg', max_res=20).shape == (20, 30, 3)
    with pytest.raises(ValueError, match=r'300 x 200 px \(0 MP\) to decode, over the 0 MP limit'):
        images.load_image(tmp_path / 'big.png', max_res=20)
    assert Image.MAX_IMAGE_PIXELS == 25_000  # restored after the open
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', None)  # PIL's switch for no limit
    assert images.load_image(tmp_path / 'big.png', max_res=20).shape == (20, 30, 3)


def test_truncated_jpeg_is_detected(tmp_path):
    src = sample_images(1)[0]
    raw = src.read_bytes()
    bad = tmp_path / 'cut.JPEG'
    bad.write_bytes(raw[:int(len(raw) * 0.6)])
    with Image.open(bad) as im:  # the header is intact: opening alone does not notice
        assert im.size == Image.open(src).size
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = True  # even if another library switched it on
        with pytest.raises(ValueError, match='truncated'):
            images.load_image(bad, max_res=64)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


# A 48x32 JPEG, arithmetic-coded (libjpeg-turbo 2.1.5's encoder, arith_code=TRUE, quality 90:
# PIL writes none), a gradient
ARITHMETIC_JPEG = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgMCAgMDAwMEAwMEBQgFBQQEBQoHBwYIDAoMDAsKCwsNDhIQDQ4R"
    "DgsLEBYQERMUFRUVDA8XGBYUGBIUFRT/2wBDAQMEBAUEBQkFBQkUDQsNFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU"
    "FBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBT/yQARCAAgADADASIAAhEBAxEB/8wACgAQEAUBEBEF/9oADAMBAAIR"
    "AxEAPwD/AOy9PTY26RYRMc61piuZgpH/ANudGldMVXELe7HaxpPjLnyaEd4Mo1GejQz7x0v1Ol1Af5dzVX3aIGHu"
    "uOMPocTAzuqk3mc29S8+tveQ7lFRdlj/ALW4/mgO+3K4q/jYf4g2GSFv5tbumeileLE+4hC4TC9rnh6jkJOPYhXx"
    "GeXdTal7UCyxuDOuGbhTUgR3/k0BFPaatkLosElUZYSzxronnQXqaheGIfwG+TXOAMM5mNph4av36R8eptArdOMo"
    "76qbhjVKR3ny2Qw5gx+MtV/t0kt2u5ugt3CYFxopYsVl0S71WFz0H7bnxfuL4JJfmmtURb81GGL8z2SOBAr7LsWY"
    "YSc/v8SRJuy80x5JyfHeKxbMdvaf0gU6Q8yD1nbjO2GnSARubS32L2RTO+iIvv2yp7I6P2i6idm80tXJFyJR/wD/"
    "AD03pNxI1uGz4xHFvCdc8JD4ZPcreQwb1cpbQDROYLBd1RwE0QPhZgWkxJYmeTUuIg1L8zr+2Pq0040qjhg5Hvbl"
    "qIZ4atb9jCZTzxt1ENLlWFyJczuyIy4/+zN1d2sYa5rmLz8UTu9GtYpvVX2CDlwpsdr972N7TRYtKRKk10AO8KXv"
    "cqBtC9pFK5iCyodDHcK4MqZqWt48ysrDhsj8gv1YJeXgdLH1eH8YZvJDDAjaQmOAHFoMb2g9j+TtNUOQoZ+D1XfB"
    "ACB3Bz7xDLC8yzS6niexylpIADR/AGrOZetFhDbO1xUGdkGxLLqA/9k=")

# A 48x32 sequential JPEG of one scan per colour (Y, Cb, Cr; libjpeg-turbo 2.1.5's encoder with
# its scan_info: PIL writes none), the same gradient
SEPARATE_SCANS_JPEG = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgMCAgMDAwMEAwMEBQgFBQQEBQoHBwYIDAoMDAsKCwsNDhIQDQ4R"
    "DgsLEBYQERMUFRUVDA8XGBYUGBIUFRT/2wBDAQMEBAUEBQkFBQkUDQsNFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU"
    "FBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBT/wAARCAAgADADASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAA"
    "AAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAk"
    "M2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKT"
    "lJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/9oA"
    "CAEBAAA/APzi07wtux8n6V1GneDt+P3f6V1OneBd2P3f6V1GnfD3fj91+ldLafDyKFVaUJEpOMuQBn8a3LTwXp8T"
    "qrSISRn5AWH5gGvJdF8LbtvyfpXeaL4O37fk/Sunj0aDTWWPyTNPgHYvAH1PatWw8PX96RljEuQQsQ24/Hr+tdBY"
    "+CLWy2eeVjJxhcZP1wOccda6HTvD6HAgsWbI4aTjB+gzkfjXk3h3wtu2/J+ld2uiNptpH5aDz5ThcjoO5/l+davh"
    "/wAEKFDMgVQMkngAV0Vno0ty/lWaeXD08zb8zf4D9a3bHwnbacQjRmWfH+rUdOOMnt/PnpXS2fhy4ZN8jLZwdAF4"
    "Pr16k/TrjpXlfhXwtv2fJXT2/hg3urSHYdsZ8tQR0x1/XNdGPDbXFwLOIfuUxvwPvN6Z9B/PNdDbeHvKxa2q/vek"
    "kgH3fYe/8vr037HwquneXFFCstycEgjhB7+/t/k71n4VWGUGZWurvj936A89egHt71//xAAfAQADAQEBAQEBAQEB"
    "AAAAAAAAAQIDBAUGBwgJCgv/xAC1EQACAQIEBAMEBwUEBAABAncAAQIDEQQFITEGEkFRB2FxEyIygQgUQpGhscEJ"
    "IzNS8BVictEKFiQ04SXxFxgZGiYnKCkqNTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqCg4SF"
    "hoeIiYqSk5SVlpeYmZqio6Slpqeoqaqys7S1tre4ubrCw8TFxsfIycrS09TV1tfY2dri4+Tl5ufo6ery8/T19vf4"
    "+fr/2gAIAQIRAD8A7MkwX9q20vc+kxWEyLAVfqsoutWWjjBX5X/ek7JeaV2nukeBipYGi+SeFpU5/wArcqsvnGCi"
    "1fpdJHz+T5vVwGRQlhXatWahFreN1eUvklZNaptPocNXM6eCpPC4WTp06b5ZSj8dSe3JDsl1el7NtqK1+bq5nLDR"
    "dFJU4x0cYtqMf7sppc9Sdt4QtfVWT0P/2gAIAQMRAD8A8rLuIOS2p+v5RxBVklLmsj9qyjPpOzU2/wAPzP8AK3Lc"
    "6Uqq5noj9nynO3JqUndv8PNn7XlOd3s+a/8AX4H/2Q==")


def test_jpegs_decode_to_the_pixels_pil_decodes_at_each_dct_scale(tmp_path, monkeypatch):
    # libjpeg read directly (jpeg_region.read_source_jpeg) gives PIL's own pixels: baseline and
    # progressive, 4:2:0 and 4:4:4, grayscale, sides not multiples of 8, at scales 1 to 1/8
    assert images.jpeg_check_missing() is None  # the region decoder is built: its way is taken
    read = []  # what read_source_jpeg gave: the pixels compared are libjpeg's, not PIL's

    def spy(*args, **kwargs):
        read.append(jpeg_region.read_source_jpeg(*args, **kwargs))
        return read[-1]
    monkeypatch.setattr(images, 'read_source_jpeg', spy)
    base = photo((203, 157), 0)
    made = {'420.jpg': dict(quality=90), '444.jpg': dict(quality=95, subsampling=0),
            'progressive.jpg': dict(quality=85, progressive=True)}
    for name, options in made.items():
        base.save(tmp_path / name, **options)
    base.convert('L').save(tmp_path / 'gray.jpg', quality=90)
    # a camera's MPO file (portrait-mode photos): PIL reads its first image
    base.save(tmp_path / 'camera.jpg', 'MPO', save_all=True, append_images=[photo((40, 30), 1)])
    assert Image.open(tmp_path / 'camera.jpg').format == 'MPO'
    for name in [*made, 'gray.jpg', 'camera.jpg']:
        for max_res in (157, 78, 39, 19):  # DCT scale 1, 2, 4, 8
            data = (tmp_path / name).read_bytes()
            target = images.shorter_side_size(203, 157, max_res)
            with Image.open(tmp_path / name) as im:
                if target != im.size:
                    im.draft('RGB', target)
                expected = np.asarray(im.convert('RGB'))
            with Image.open(tmp_path / name) as im:
                got, orientation = images._decoded(im, data, target)
            assert expected.shape[0] == -(-157 // images.draft_scale((203, 157), target))
            assert np.array_equal(got, expected) and orientation == 1, (name, max_res)
            assert read[-1][0] == 'intact' and read[-1][2] is got
    assert len(read) == 5 * 4


def test_damaged_jpeg_data_is_an_error_and_a_missing_eoi_marker_is_not(tmp_path, monkeypatch):
    # Baseline and progressive JPEGs of the same photo, each: whole; cut inside its data and
    # ended with an EOI marker (PIL decodes it without a word, grey where the data is missing);
    # without its EOI marker alone (every pixel is there; PIL refuses it as truncated).
    progressive = tmp_path / 'progressive.JPEG'
    photo((120, 80), 0).save(progressive, quality=90, progressive=True)
    for src in (sample_images(1)[0], progressive):
        raw, whole = src.read_bytes(), np.asarray(Image.open(src).convert('RGB'))
        damaged = tmp_path / f'damaged_{src.name}'
        last_scan = raw.rindex(b'\xff\xda')  # SOS marker; a cut in the middle of its data:
        damaged.write_bytes(raw[:(last_scan + len(raw)) // 2] + b'\xff\xd9')
        with Image.open(damaged) as im:
            grey = np.asarray(im.convert('RGB'))  # the premise: PIL raises nothing
        assert grey.shape == whole.shape and not np.array_equal(grey, whole)
        with pytest.raises(ValueError, match=r'^corrupt JPEG data \(Corrupt JPEG data: '
                                             r'premature end of data segment\)'):
            images.load_image(damaged, max_res=1000)
        no_eoi = tmp_path / f'no_eoi_{src.name}'
        no_eoi.write_bytes(raw[:-2])
        with pytest.raises(OSError, match='truncated'), Image.open(no_eoi) as im:
            im.load()
        assert np.array_equal(images.load_image(no_eoi, max_res=1000), whole)
    # a camera's MPO file (portrait-mode photos) whose first image, the one PIL reads, has an EOI
    # marker in the middle of its data: PIL decodes it without a word
    mpo = tmp_path / 'camera.jpg'
    photo((120, 80), 0).save(mpo, 'MPO', save_all=True, append_images=[photo((40, 30), 1)])
    data = bytearray(mpo.read_bytes())
    scan = data.index(b'\xff\xda')
    middle = (scan + data.index(b'\xff\xd9', scan)) // 2
    data[middle:middle + 2] = b'\xff\xd9'
    mpo.write_bytes(bytes(data))
    with Image.open(mpo) as im:
        assert im.format == 'MPO' and np.asarray(im.convert('RGB')).shape == (80, 120, 3)
    with pytest.raises(ValueError, match=r'^corrupt JPEG data \(Corrupt JPEG data: premature'):
        images.load_image(mpo, max_res=1000)
    # a sequential JPEG of one scan per colour: whole but for its EOI marker, read; cut before
    # its last colour's scan and given an EOI marker (PIL decodes it without a word, that colour
    # missing), truncated
    separate = tmp_path / 'separate_scans.jpg'
    data = base64.b64decode(SEPARATE_SCANS_JPEG)
    with Image.open(io.BytesIO(data)) as im:
        whole = np.asarray(im.convert('RGB'))
    separate.write_bytes(data[:-2])
    assert np.array_equal(images.load_image(separate, max_res=1000), whole)
    separate.write_bytes(data[:data.rindex(b'\xff\xda')] + b'\xff\xd9')
    with Image.open(separate) as im:
        assert not np.array_equal(np.asarray(im.convert('RGB')), whole)
    with pytest.raises(ValueError, match='the JPEG is truncated'):
        images.load_image(separate, max_res=1000)
    # a progressive JPEG cut between two scans: its last refinements missing, no grey, but
    # truncated; with an EOI marker it is a legal JPEG (an encoder may stop refining), read, to
    # PIL's pixels but for libjpeg-turbo's block smoothing of the coefficients not refined, which
    # differs between versions (2.1.5 here, PIL's 3.x: 0.02 to 0.52 grey levels apart on
    # average over the cuts of two photos)
    (tmp_path / 'between_scans.JPEG').write_bytes(raw[:last_scan])
    with pytest.raises(ValueError, match='the JPEG is truncated'):
        images.load_image(tmp_path / 'between_scans.JPEG', max_res=1000)
    (tmp_path / 'between_scans.JPEG').write_bytes(raw[:last_scan] + b'\xff\xd9')
    with Image.open(tmp_path / 'between_scans.JPEG') as im:
        expected = np.asarray(im.convert('RGB')).astype(int)
    got = images.load_image(tmp_path / 'between_scans.JPEG', max_res=1000)
    assert got.shape == expected.shape and np.abs(got - expected).mean() < 1
    # arithmetic-coded data that runs out is filled in without a warning: without its EOI marker
    # such a JPEG is truncated, wherever it was cut (PIL refused them too)
    arithmetic = tmp_path / 'arithmetic.jpg'
    arithmetic.write_bytes(base64.b64decode(ARITHMETIC_JPEG))
    with Image.open(arithmetic) as im:
        assert np.array_equal(images.load_image(arithmetic, max_res=1000),
                              np.asarray(im.convert('RGB')))
    raw = arithmetic.read_bytes()
    for cut in (raw[:len(raw) * 6 // 10], raw[:-2]):
        arithmetic.write_bytes(cut)
        with pytest.raises(ValueError, match='the JPEG is truncated'):
            images.load_image(arithmetic, max_res=1000)
    # without the built region decoder, PIL alone judges, and the converter says so
    monkeypatch.setattr(images, 'jpeg_check_missing', lambda: 'the decoder is not built')
    assert images.load_image(tmp_path / f'damaged_{progressive.name}', max_res=1000).shape == (
        80, 120, 3)
    (tmp_path / 'data' / 'train' / 'n01').mkdir(parents=True)
    shutil.copy(progressive, tmp_path / 'data' / 'train' / 'n01')
    monkeypatch.setattr(write, 'jpeg_check_missing', images.jpeg_check_missing)
    with pytest.warns(UserWarning, match=r'^the decoder is not built; until then, JPEG files are '
                                         r'not checked: one with damaged data is stored'):
        write.main(write.parse_args(['--data-dir', str(tmp_path / 'data'), '--split', 'train',
                                     '--out', str(tmp_path / 'b.beton'), '--num-workers', '1']))


def test_bad_files_skipped_labels_kept_and_reported(tmp_path):
    root = tmp_path / 'data'
    expected = make_unusual(root / 'train' / 'n01')
    bad = make_bad(root / 'train' / 'n02', sample_images(1)[0])
    (root / 'train' / 'n03').mkdir()
    for i, src in enumerate(sample_images(3)):
        Image.open(src).save(root / 'train' / 'n02' / f'ok{i}.JPEG')
        Image.open(src).save(root / 'train' / 'n03' / f'ok{i}.JPEG')
    classes = sources.find_classes(root / 'train')
    samples = sources.list_samples(root / 'train', classes)
    out = tmp_path / 'out' / 'train.beton'
    stats = writer.write_beton(samples, out, max_res=1000, write_mode='raw', num_workers=2,
                             skip_unreadable=True)
    assert stats['skipped'] == len(bad) and stats['images'] == len(samples) - len(bad)
    report = beton_out.skipped_report_path(out)
    assert report.name == 'train.skipped.tsv' and stats['skipped_report'] == str(report)
    rows = [line.split('\t') for line in report.read_text().splitlines()]
    assert {r[0].split('/')[-1] for r in rows} == bad and all(r[1] for r in rows)
    reasons = {r[0].split('/')[-1]: r[1] for r in rows}
    assert reasons['zero.JPEG'].endswith('zero.JPEG\': it is empty (0 bytes)')
    assert reasons['damaged.JPEG'] == ('InputError: corrupt JPEG data (Corrupt JPEG data: '
                                       'premature end of data segment): libjpeg fills what it '
                                       'cannot read with grey')
    assert reasons['truncated.JPEG'].startswith('InputError: the JPEG is truncated')
    assert 'empty' not in reasons['notes.jpg']
    images, labels = stored_raw_images(out)
    kept = [(p, l) for p, l in samples if p.split('/')[-1] not in bad]
    assert labels == [l for _, l in kept]  # no label shift
    for (path, _), img in zip(kept, images):
        name = path.split('/')[-1]
        if name in expected:
            assert np.array_equal(img, expected[name]), name
        else:
            assert np.array_equal(img, np.asarray(Image.open(path).convert('RGB'))), name
    assert sorted(p.name for p in out.parent.iterdir()) == ['train.beton', 'train.skipped.tsv']
    # a name with a tab or a newline: escaped, a line of two cells per file (the reason's path
    # as column 1's)
    for name in ('tab\there.JPEG', 'new\nline.JPEG'):
        (root / 'train' / 'n02' / name).write_bytes(b'')
    stats = writer.write_beton(sources.list_samples(root / 'train', classes), out, max_res=64,
                               num_workers=1, skip_unreadable=True)
    rows = [line.split('\t') for line in report.read_text().splitlines()]
    assert len(rows) == stats['skipped'] == len(bad) + 2 and {len(r) for r in rows} == {2}
    odd = {r[0]: r[1] for r in rows if r[0].endswith(('here.JPEG', 'line.JPEG'))}
    assert sorted(odd) == [f"{root / 'train' / 'n02'}/{name}"
                           for name in ('new\\nline.JPEG', 'tab\\there.JPEG')]
    assert all(reason.endswith(f"'{path}': it is empty (0 bytes)")
               for path, reason in odd.items())
    for name in ('tab\there.JPEG', 'new\nline.JPEG'):
        (root / 'train' / 'n02' / name).unlink()
    # a later clean run removes the stale report
    writer.write_beton(kept, out, max_res=64, num_workers=1, skip_unreadable=True)
    assert not report.exists()


def test_cli_skips_by_default_and_strict_fails(tmp_path, capsys):
    root = tmp_path / 'data'
    for i, src in enumerate(sample_images(4)):
        (root / 'train' / f'n0{i % 2}').mkdir(parents=True, exist_ok=True)
        Image.open(src).save(root / 'train' / f'n0{i % 2}' / f'{i}.JPEG')
    (root / 'train' / 'n00' / 'zero.JPEG').write_bytes(b'')
    out = tmp_path / 'b' / 'train_32.beton'
    args = ['--data-dir', str(root), '--split', 'train', '--max-res', '32', '--out', str(out),
            '--num-workers', '1']
    assert write.cli(args + ['--strict']) != 0
    err = capsys.readouterr().err
    assert 'zero.JPEG' in err and 'Traceback' not in err
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == []
    assert write.cli(args) == 0
    captured = capsys.readouterr()
    assert '4 images, 2 classes, 1 skipped' in captured.out
    assert 'train_32.skipped.tsv' in captured.out and 'zero.JPEG' not in captured.out
    assert 'zero.JPEG' in beton_out.skipped_report_path(out).read_text()
    assert betons.num_samples(out) == 4
    # a class whose every file is skipped is named (the summary counted it, '2 of 3 classes')
    (root / 'train' / 'n02').mkdir()
    (root / 'train' / 'n02' / 'only.JPEG').write_bytes(b'not a JPEG')
    assert write.cli(args + ['--overwrite']) == 0
    captured = capsys.readouterr()
    assert '4 images, 2 of 3 classes, 2 skipped' in captured.out
    assert captured.err.endswith('; class(es) left with no image by them: n02\n')


def stored_records(path) -> list:
    """The image records of a .beton as bytes, in sample order."""
    data = verify.file_bytes(path)
    return [verify.record_bytes(data, r).tobytes() for r in verify.records(path)]


def test_records_are_encode_jpeg_of_the_stored_pixels_with_restart_markers(tmp_path, capsys):
    """Each JPEG record is images.encode_jpeg of the pixels images.load_image gives (byte for
    byte), with a DRI segment by default; --restart-interval 0 writes ffcv's own encode_jpeg
    bytes, without markers (the files written before); a negative interval is refused."""
    from ffcv.fields.rgb_image import encode_jpeg
    root = tmp_path / 'data'
    for i, src in enumerate(sample_images(4)):  # widths 120, 150, 180, 210: 8 to 14 MCU columns
        (root / 'train' / f'n0{i % 2}').mkdir(parents=True, exist_ok=True)
        Image.open(src).convert('RGB').resize((120 + 30 * i, 100)).save(
            root / 'train' / f'n0{i % 2}' / f'{i}.JPEG')
    samples = sources.list_samples(root / 'train', sources.find_classes(root / 'train'))
    pixels = [images.load_image(path, 256) for path, _ in samples]
    for interval in (images.DEFAULT_RESTART_INTERVAL, 1, 0):
        out = tmp_path / f'rst{interval}.beton'
        assert write.cli(['--data-dir', str(root), '--split', 'train', '--out', str(out),
                          '--num-workers', '2', '--restart-interval', str(interval)]) == 0
        records = stored_records(out)
        assert records == [images.encode_jpeg(a, quality=90, restart_interval=interval).tobytes()
                           for a in pixels]
        assert all((b'\xff\xdd' in r) == (interval > 0) for r in records)
    assert records == [encode_jpeg(a, 90).tobytes() for a in pixels]
    capsys.readouterr()
    for option, value, message in (('--restart-interval', '-1', 'must be >= 0'),
                                   ('--jpeg-quality', '150', r'must lie in [1, 100]'),
                                   ('--max-res', '0', 'must be >= 1'),
                                   ('--num-workers', '-1', 'must be >= 0 (0: one per core'),
                                   ('--subset', '-1', 'must be >= 1 (or 0: all the images)'),
                                   ('--compress-probability', '2.0', 'must lie in [0, 1]')):
        with pytest.raises(SystemExit):  # OpenCV used quality 100 for 150, --subset -1 all
            write.cli(['--data-dir', str(root), '--split', 'train', option, value])
        assert f'{option} {value}: {message}' in capsys.readouterr().err


def test_restart_interval_for_divides_the_mcu_columns():
    """The largest divisor of the MCU columns (16 px) up to the interval asked for."""
    interval = images.restart_interval_for
    assert [interval(341, n) for n in (0, 1, 2, 3, 4, 10, 11, 30)] == [0, 1, 2, 2, 2, 2, 11, 22]
    assert [interval(256, n) for n in (3, 4, 8, 100)] == [2, 4, 8, 16]
    assert interval(23 * 16, 4) == 1 and interval(1, 4) == 1  # a prime number of columns; 1 px
    with pytest.raises(ValueError, match='restart_interval=-1'):
        interval(341, -1)


def test_split_folder_problems_are_named(tmp_path):
    root = tmp_path / 'data'
    for wnid in ('n01', 'n02', 'n03'):
        (root / 'train' / wnid).mkdir(parents=True)
    src = sample_images(1)[0]
    for wnid in ('n01', 'n03'):
        (root / 'train' / wnid / 'a.JPEG').write_bytes(src.read_bytes())
    (root / 'train' / 'n02' / 'readme.txt').write_text('no images here')
    classes = sources.find_classes(root / 'train')
    with pytest.warns(UserWarning, match='n02'):  # the class folder with no images
        samples = sources.list_samples(root / 'train', classes)
    assert [l for _, l in samples] == [0, 2]
    (root / 'val' / 'n03').mkdir(parents=True)
    (root / 'val' / 'n03' / 'b.JPEG').write_bytes(src.read_bytes())
    with pytest.warns(UserWarning, match='n01, n02'):  # classes missing from val
        assert [l for _, l in sources.list_samples(root / 'val', classes)] == [2]
    (root / 'empty').mkdir()
    with pytest.raises(ValueError, match='empty'):
        sources.list_samples(root / 'empty', classes)
    with pytest.raises(FileNotFoundError, match='nowhere'):
        sources.list_samples(root / 'nowhere', classes)
    with pytest.raises(ValueError, match='no class folders'):
        sources.find_classes(root / 'empty')


def test_class_names_the_class_list_cannot_hold_are_refused_before_any_work(tmp_path, capsys):
    """A class folder whose name is not UTF-8 (a zip made on Windows) failed only when the class
    list was written, after the .beton: a .beton with no classes.tsv, which trained without a
    word and left predict asking for one; a tab in a name made classes.tsv read back as another
    name. Both are refused by find_classes, naming the folders. A val folder whose name differs
    from a train folder's only in its Unicode form (macOS writes NFD) is named as such: the two
    print alike."""
    train = tmp_path / 'data' / 'train'
    for name in (b'caf\xe9', b'tab\tname', 'café ☕'.encode()):
        try:
            os.makedirs(os.fsencode(train) + b'/' + name)
        except OSError as e:  # APFS, ZFS with utf8only
            pytest.skip(f'this filesystem refuses folder names that are not UTF-8 ({e}), so no '
                        f'such class folder can exist here')
    with pytest.raises(ValueError, match=r"b'caf\\xe9', 'tab\\tname' are not valid UTF-8 or hold "
                                         r'a tab or line break.*rename'):
        sources.find_classes(train)
    assert write.cli(['--data-dir', str(tmp_path / 'data'), '--split', 'train',
                      '--out', str(tmp_path / 'out.beton')]) == 1
    assert 'not valid UTF-8' in capsys.readouterr().err
    assert not list(tmp_path.glob('out*'))
    for name in (b'caf\xe9', b'tab\tname'):
        os.rmdir(os.fsencode(train) + b'/' + name)
    (train / 'caf\u00e9').mkdir()  # NFC, as Linux and Windows write it
    (tmp_path / 'data' / 'val' / 'cafe\u0301').mkdir(parents=True)  # NFD, as macOS writes it
    classes = sources.find_classes(train)
    assert classes == ['caf\u00e9', 'café ☕']
    (tmp_path / 'solo' / 'only').mkdir(parents=True)
    with pytest.warns(UserWarning, match=r'one class folder \(only\): a classifier of one class'):
        assert sources.find_classes(tmp_path / 'solo') == ['only']
    with pytest.raises(ValueError, match=r"'cafe\\u0301' differ from a train folder only in how "
                                         'Unicode writes their accents'):
        sources.list_samples(tmp_path / 'data' / 'val', classes)
    # train folders that look alike: named in a warning (each a class, shown alike everywhere)
    for name in ('cafe\u0301', 'Dog', 'dog ', 'dog'):
        (train / name).mkdir()
    with pytest.warns(UserWarning, match=re.escape(
            f"{train}: class folders 'Dog' and 'dog' and 'dog '; 'cafe\\u0301' and 'caf\\xe9' "
            f"differ only in case, spaces at their ends or how Unicode writes their accents (NFC "
            f"or NFD: they print alike): each is a class of its own; rename or merge them if they "
            f"are one class")):
        assert len(sources.find_classes(train)) == 6


def test_a_val_folder_named_as_a_train_folder_in_another_case_is_named_as_such(tmp_path):
    """val/Fish beside train/fish was refused as a folder train lacks, with no hint at the case."""
    for split, name in (('train', 'fish'), ('train', 'bird'), ('val', 'Fish')):
        folder = tmp_path / split / name
        folder.mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(folder / 'a.JPEG')
    classes = sources.find_classes(tmp_path / 'train')
    with pytest.raises(ValueError, match=r'class folder\(s\) Fish are not in the train split.*'
                                         r'\(Fish and train/fish differ in case only: '
                                         r'rename one\)$'):
        sources.list_samples(tmp_path / 'val', classes)


def test_verify(tmp_path, capsys):
    root = tmp_path / 'data'
    for i, src in enumerate(sample_images(6)):
        (root / 'train' / f'n0{i % 3}').mkdir(parents=True, exist_ok=True)
        Image.open(src).resize((100 + 20 * i, 90)).save(root / 'train' / f'n0{i % 3}' / f'{i}.JPEG')
    out = tmp_path / 'v.beton'
    assert write.cli(['--data-dir', str(root), '--split', 'train', '--max-res', '64',
                            '--out', str(out), '--num-workers', '1']) == 0
    capsys.readouterr()
    assert write.cli(['--verify', str(out)]) == 0
    text = capsys.readouterr().out
    assert '6 images, 3 classes' in text and '(6 JPEG, 0 raw)' in text
    assert '0/n00: 2, 1/n01: 2, 2/n02: 2' in text and '64-127: 6' in text and 'OK' in text
    report = verify.verify_beton(out)
    assert report['per_class'] == {0: 2, 1: 2, 2: 2} and not report['problems']

    # a JPEG record with garbage inside -> a problem naming the record
    records = verify.records(out)
    blob = bytearray(out.read_bytes())
    ptr = int(records['data_ptr'][3])
    blob[ptr:ptr + 40] = b'\x00' * 40  # wipes the JPEG's SOI marker and header
    broken = tmp_path / 'broken.beton'
    broken.write_bytes(bytes(blob))
    assert write.cli(['--verify', str(broken)]) == 1
    err = capsys.readouterr().err
    assert 'record 3' in err and '1 problem' in err and 'Traceback' not in err

    for n in (30, 2000):  # truncated: in the header, or before the end of the data
        cut = tmp_path / f'cut{n}.beton'
        cut.write_bytes(out.read_bytes()[:n])
        assert write.cli(['--verify', str(cut)]) == 1
        err = capsys.readouterr().err
        assert str(cut) in err and 'Traceback' not in err
    cut = tmp_path / 'cut_end.beton'
    cut.write_bytes(out.read_bytes()[:int(records['data_ptr'].max()) + 10])
    assert write.cli(['--verify', str(cut)]) == 1
    assert write.cli(['--verify', str(tmp_path / 'missing.beton')]) == 1
    assert 'missing.beton' in capsys.readouterr().err


def test_records_give_each_sample_its_size_label_and_bytes(tmp_path):
    """``verify.records``: per sample the stored image's mode, height, width, byte range and
    label; ``record_bytes`` the JPEG itself; a missing, truncated or damaged file raises."""
    classes = sources.find_classes(SAMPLE / 'train')
    samples = sources.list_samples(SAMPLE / 'train', classes)[::50][:6]
    out = tmp_path / 'r.beton'
    writer.write_beton(samples, out, max_res=64, num_workers=1)
    records = verify.records(out)
    assert records.dtype == verify.RECORD_TYPE and len(records) == len(samples)
    assert records['label'].tolist() == [label for _, label in samples]
    assert (records['mode'] == verify.JPEG_MODE).all() and (records['size'] > 0).all()
    assert (np.minimum(records['height'], records['width']) == 64).all()
    data = verify.file_bytes(out)
    for rec in records:
        jpeg = verify.record_bytes(data, rec)
        assert jpeg.dtype == np.uint8 and jpeg.size == rec['size']
        with Image.open(io.BytesIO(jpeg.tobytes())) as im:
            assert im.size == (rec['width'], rec['height'])
    with pytest.raises(verify.CorruptBetonError, match='beyond the end of the file'):
        verify.record_bytes(data[:int(records['data_ptr'][-1]) + 10], records[-1])
    damaged = records[-1].copy()
    damaged['size'] = -1
    with pytest.raises(verify.CorruptBetonError, match='not in the allocation table'):
        verify.record_bytes(data, damaged)
    with pytest.raises(FileNotFoundError):
        verify.records(tmp_path / 'missing.beton')
    cut = tmp_path / 'cut.beton'
    cut.write_bytes(out.read_bytes()[:int(records['data_ptr'].max()) + 10])
    with pytest.raises(verify.CorruptBetonError, match='truncated'):
        verify.records(cut)


def test_not_enough_disk_space(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple
    root = tmp_path / 'data'
    (root / 'train' / 'n01').mkdir(parents=True)
    for i, src in enumerate(sample_images(5)):
        Image.open(src).resize((400, 300)).save(root / 'train' / 'n01' / f'{i}.JPEG')
    samples = sources.list_samples(root / 'train', ['n01'])
    raw = writer.estimate_beton_bytes(samples, max_res=256, write_mode='raw')
    jpg = writer.estimate_beton_bytes(samples, max_res=256, write_mode='jpg')
    assert raw >= 5 * 341 * 256 * 3 and jpg < raw
    usage = namedtuple('usage', 'total used free')
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage(10 ** 9, 10 ** 9 - 10 ** 6, 10 ** 6))
    out = tmp_path / 'o' / 'train.beton'
    out.parent.mkdir()
    out.write_bytes(b'previous')
    assert write.cli(['--data-dir', str(root), '--split', 'train', '--out', str(out),
                      '--overwrite', '--write-mode', 'raw', '--num-workers', '1']) == 1
    err = capsys.readouterr().err
    assert 'GB free' in err and str(out.parent) in err and 'Traceback' not in err
    assert out.read_bytes() == b'previous'
    assert sorted(p.name for p in out.parent.iterdir()) == ['train.beton']
    # /dev/shm holds ffcv's table of records (24 bytes an image): Docker's 64 MiB held 2.7M
    # images' table; past it, a writer process died by SIGBUS late in the conversion
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage(
        *((64 * 2 ** 20, 64 * 2 ** 20 - 100, 100) if str(p) == writer.SHARED_MEMORY
          else (10 ** 12, 0, 10 ** 12))))
    monkeypatch.setattr(writer.ImageFiles, '__getitem__', None)  # refused before any image
    assert write.cli(['--data-dir', str(root), '--split', 'train', '--out', str(out),
                      '--overwrite', '--num-workers', '1']) == 1
    err = capsys.readouterr().err
    assert (f': {writer.SHARED_MEMORY}: 0.0 MiB free, but the writer processes keep the table of '
            f'the .beton\'s records there, 1.0 MiB: give it more room (docker run '
            f'--shm-size=1g;') in err
    assert sorted(p.name for p in out.parent.iterdir()) == ['train.beton']
    monkeypatch.undo()

    class Ended:
        pid, exitcode = 12, -signal.SIGBUS
    with pytest.raises(writer.WriterProcessError, match=r'a writer process \(pid 12\) was killed '
                                                          r'by SIGBUS \(a mapped file ran out of '
                                                          r'room: is /dev/shm full\?\) after 3'):
        writer._check_workers([Ended()], 3, 5)
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage(10 ** 12, 0, 10 ** 12))
    assert write.cli(['--data-dir', str(root), '--split', 'train', '--out', str(out),
                      '--overwrite', '--write-mode', 'raw', '--num-workers', '1']) == 0
    assert betons.num_samples(out) == 5


FFCV_PAGE = 8 * 2 ** 20  # ffcv's DatasetWriter writes the images in pages of this many bytes


def test_the_space_estimate_covers_large_photos_stored_at_a_higher_quality(tmp_path):
    """1600x1200 photos saved at JPEG q50, stored at shorter side 256 and q90: a shrunk and
    re-encoded image takes more bytes per pixel than its file (here about 3x), which the
    estimate from the files' sizes missed; the records' bytes are covered, within 2x."""
    root = tmp_path / 'train' / 'n01'
    root.mkdir(parents=True)
    for i, src in enumerate(sample_images(12)):
        Image.open(src).convert('RGB').resize((1600, 1200)).save(root / f'{i}.JPEG', quality=50)
    samples = sources.list_samples(root.parent, ['n01'])
    estimate = writer.estimate_beton_bytes(samples, max_res=256) - FFCV_PAGE
    out = tmp_path / 'train.beton'
    writer.write_beton(samples, out, max_res=256, num_workers=1, check_space=False)
    data = verify.file_bytes(out)
    stored = sum(len(verify.record_bytes(data, r)) for r in verify.records(out))
    assert stored <= estimate <= 2 * stored, (stored, estimate)


def partial_bytes(out) -> int:
    """The size of the largest partial file of ``out`` (-1: none)."""
    sizes = [-1]
    for p in out.parent.glob(f'.{out.name}.partial-*'):
        try:
            sizes.append(p.stat().st_size)
        except FileNotFoundError:  # renamed or removed meanwhile
            pass
    return max(sizes)


def kill_mid_write(cmd, out, previous: bytes) -> bool:
    """Run the writer ``cmd`` and SIGKILL it while it writes ``out``. Once its partial file holds
    a page of images, the writer's process group is frozen (SIGSTOP): if the partial file is still
    there and ``out`` still holds ``previous``, the rename has not happened and cannot happen
    before the SIGKILL. Returns True if the kill provably landed mid-write, False if the writer had
    finished first (it then exited 0)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while proc.poll() is None:
            if partial_bytes(out) >= FFCV_PAGE:
                os.killpg(proc.pid, signal.SIGSTOP)
                frozen_mid_write = (any(out.parent.glob(f'.{out.name}.partial-*'))
                                    and out.read_bytes() == previous)
                os.killpg(proc.pid, signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
                return frozen_mid_write
            time.sleep(0.01)
        assert proc.returncode == 0, 'the writer failed before it could be killed'
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_kill_9_leaves_no_file_and_keeps_previous(tmp_path):
    """SIGKILL while the .beton is being written (shown by freezing the writer first): the
    previous complete file stays byte for byte, and the next run removes the dead writer's
    temporaries. If the writer outruns the check (it never has), the test retries with twice
    the images; it fails unless a kill landed mid-write."""
    photos = sorted((SAMPLE / 'train').glob('*/*.JPEG'))
    out = tmp_path / 'out' / 'train.beton'
    small = [(photos[i], i % 2) for i in range(6)]
    writer.write_beton(small, out, max_res=32, num_workers=1)
    previous = out.read_bytes()
    landed = False
    for attempt in range(3):  # 8 x 340 raw 160 px images (about 26 pages), then 16 x, 32 x
        root = tmp_path / f'data{attempt}'
        for wnid in ('n01', 'n02'):
            (root / 'train' / wnid).mkdir(parents=True)
        for k in range(8 * 2 ** attempt):
            for i, src in enumerate(photos):
                (root / 'train' / f'n0{1 + i % 2}' / f'{k}_{i}.JPEG').symlink_to(src)
        cmd = [PYTHON, 'write_beton.py', '--data-dir', str(root), '--split', 'train',
               '--max-res', '160', '--write-mode', 'raw', '--out', str(out), '--overwrite',
               '--num-workers', '2']
        if kill_mid_write(cmd, out, previous):
            landed = True
            break
        class_list_path(out).unlink()  # it finished: back to the small file, and again
        writer.write_beton(small, out, max_res=32, num_workers=1)
        previous = out.read_bytes()
    assert landed, ('no kill landed while a partial file was being written, in three attempts: '
                    'the writer finished first each time, or wrote no partial file')
    assert out.read_bytes() == previous  # the complete previous file is untouched
    leftovers = [p.name for p in out.parent.iterdir() if p.name != 'train.beton']
    assert leftovers and all(name.startswith('.') for name in leftovers)  # hidden temporaries
    assert not class_list_path(out).exists() and not beton_out.skipped_report_path(out).exists()
    # the next run into the folder removes the dead writer's temporaries
    writer.write_beton(small, out, max_res=32, num_workers=1)
    assert sorted(p.name for p in out.parent.iterdir()) == ['train.beton']


# ----------------------------------------------------------------------------------------------
# Input layouts: the same images as class folders, Kaggle's CLS-LOC tree and the raw tars
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def three_layouts(tmp_path):
    """The same demo images (3 classes, 3 train + 2 val each) in the three layouts."""
    import io
    import tarfile
    wnids = sorted(p.name for p in (SAMPLE / 'train').iterdir())[:3]
    picks = {split: {w: sorted((SAMPLE / split / w).glob('*.JPEG'))[:n] for w in wnids}
             for split, n in (('train', 3), ('val', 2))}
    folders, kaggle, tars = tmp_path / 'folders', tmp_path / 'kaggle', tmp_path / 'tars'
    cls_loc = kaggle / 'ILSVRC' / 'Data' / 'CLS-LOC'
    for split in ('train', 'val'):
        for w, images_of_w in picks[split].items():
            for f in images_of_w:
                for dest in (folders / split / w, cls_loc / 'train' / w if split == 'train'
                             else cls_loc / 'val'):
                    dest.mkdir(parents=True, exist_ok=True)
                    (dest / f.name).write_bytes(f.read_bytes())
    # the val labels list the images in another order than the files' and carries box tokens
    rows = [f'{f.stem},{w} 1 2 30 40 {w} 5 6 70 80' for w in reversed(wnids)
            for f in picks['val'][w]]
    solution = 'ImageId,PredictionString\n' + '\n'.join(rows) + '\n'
    mapping = ''.join(f'{w} name{i}, other\n' for i, w in enumerate(wnids))
    for root in (kaggle, tars):
        root.mkdir(exist_ok=True)
        (root / 'LOC_val_solution.csv').write_text(solution)
        (root / 'LOC_synset_mapping.txt').write_text(mapping)

    def add(tf, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))

    with tarfile.open(tars / 'ILSVRC2012_img_train.tar', 'w') as outer:
        for w in reversed(wnids):  # archive order must not matter
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode='w') as inner:
                for f in reversed(picks['train'][w]):
                    add(inner, f.name, f.read_bytes())
            add(outer, f'{w}.tar', buf.getvalue())
    with tarfile.open(tars / 'ILSVRC2012_img_val.tar', 'w') as tf:
        for w in wnids:
            for f in picks['val'][w]:
                add(tf, f.name, f.read_bytes())
    return {'folders': folders, 'kaggle': kaggle, 'tars': tars}, wnids


def test_layouts_detected_and_give_identical_betons(three_layouts, tmp_path):
    roots, wnids = three_layouts
    for layout, root in roots.items():
        assert sources.detect_layout(root) == layout
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='empty: no known input layout'):
        sources.detect_layout(tmp_path / 'empty')
    with pytest.raises(FileNotFoundError, match='nowhere: no such folder'):  # was: no layout
        sources.detect_layout(tmp_path / 'nowhere')
    named_train = tmp_path / 'train'  # a data folder that happens to be called train
    (named_train / 'train' / 'n01').mkdir(parents=True)
    assert sources.detect_layout(named_train) == 'folders'
    with pytest.raises(FileNotFoundError, match=f'this is a split folder.*\\({roots["folders"]}\\) '
                                                f'and --split train'):
        sources.detect_layout(roots['folders'] / 'train')
    for split, n in (('train', 9), ('val', 6)):
        results = {}
        for layout, root in roots.items():
            classes, samples, names = sources.load_split(root, split)
            assert classes == wnids and len(samples) == n
            assert [l for _, l in samples] == sorted(l for _, l in samples)
            # the tars are read in place: no file was extracted
            assert all((ilsvrc.TAR_REF_SEP in p) == (layout == 'tars') for p, _ in samples)
            if layout == 'tars' and split == 'train':  # a member named with its class's tar
                assert all(p.split('::')[1].startswith(f'{wnids[l]}.tar/') for p, l in samples)
            out = tmp_path / layout / f'{split}.beton'
            args = ['--data-dir', str(root), '--split', split, '--max-res', '32', '--out',
                    str(out), '--num-workers', '1', '--write-mode', 'raw']
            assert write.cli(args if layout == 'folders' else args + ['--layout', layout]) == 0
            images, labels = stored_raw_images(out)
            results[layout] = (labels, [img.tobytes() for img in images],
                               class_list_path(out).read_text())
        assert results['folders'] == results['kaggle'] == results['tars'], split
        assert sorted(set(results['tars'][0])) == [0, 1, 2]
    # names: imagenet_wnids.tsv first, LOC_synset_mapping.txt for wnids it lacks
    assert ilsvrc.synset_mapping_names(roots['kaggle'])[wnids[1]] == 'name1'
    write_class_list(tmp_path / 'c.tsv', ['n00000001', wnids[0]], {'n00000001': 'thing'})
    assert (tmp_path / 'c.tsv').read_text() == f'0\tn00000001\tthing\n1\t{wnids[0]}\ttench\n'


def test_kaggle_val_image_without_label_is_an_error(three_layouts):
    roots, _ = three_layouts
    val = roots['kaggle'] / 'ILSVRC' / 'Data' / 'CLS-LOC' / 'val'
    (val / 'ILSVRC2012_val_99999999.JPEG').write_bytes(next(val.iterdir()).read_bytes())
    with pytest.raises(ValueError, match='ILSVRC2012_val_99999999'):
        sources.load_split(roots['kaggle'], 'val')


def test_hidden_val_files_are_left_out_and_a_missing_label_names_its_file(three_layouts):
    """A macOS ``._`` copy among Kaggle's flat val images, and a hidden member of the val tar,
    are left out, as in class folders (they failed the whole split: 'no label'); an image
    without a label is refused naming the label file the labels came from."""
    import io
    import tarfile
    roots, _ = three_layouts
    val = roots['kaggle'] / 'ILSVRC' / 'Data' / 'CLS-LOC' / 'val'
    first = sorted(val.iterdir())[0]
    (val / f'._{first.name}').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    assert len(sources.load_split(roots['kaggle'], 'val')[1]) == 6
    with tarfile.open(roots['tars'] / 'ILSVRC2012_img_val.tar', 'a') as tf:
        info = tarfile.TarInfo(f'._{first.name}')
        info.size = 4
        tf.addfile(info, io.BytesIO(b'\x00\x05\x16\x07'))
    assert len(sources.load_split(roots['tars'], 'val')[1]) == 6
    (val / 'ILSVRC2012_val_99999999.JPEG').write_bytes(first.read_bytes())
    with pytest.raises(ValueError, match='1 val image.*no label in .*kaggle/LOC_val_solution.csv'):
        sources.load_split(roots['kaggle'], 'val')


def test_half_finished_layouts_say_which_data_dir_or_layout_reads_them(three_layouts, tmp_path):
    """Kaggle's val images already sorted into class folders: the error names the --data-dir
    that reads them as class folders (it said 'no val images found'). The raw tars beside an
    extracted val/ (detected as class folders): the error names --layout tars (it said only
    'train split folder not found')."""
    import shutil
    roots, wnids = three_layouts
    cls_loc = roots['kaggle'] / 'ILSVRC' / 'Data' / 'CLS-LOC'
    for f in sorted((cls_loc / 'val').iterdir()):
        (cls_loc / 'val' / wnids[0]).mkdir(exist_ok=True)
        f.rename(cls_loc / 'val' / wnids[0] / f.name)
    with pytest.raises(ValueError, match=f'holds class folders.*--data-dir {cls_loc}'):
        sources.load_split(roots['kaggle'], 'val')
    with pytest.warns(UserWarning, match='2 of the 3 train classes have no folder'):
        assert len(sources.load_split(cls_loc, 'val')[1]) == 6
    shutil.copytree(roots['folders'] / 'val', roots['tars'] / 'val')
    for split in ('train', 'val'):
        with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar is here: --layout '
                                                    'tars'):
            sources.load_split(roots['tars'], split)
    assert len(sources.load_split(roots['tars'], 'train', 'tars')[1]) == 9


def test_a_train_tar_cut_short_is_a_one_line_error_naming_it(three_layouts, tmp_path, capsys):
    """An ILSVRC2012_img_train.tar whose download was cut short: in its first header, in a
    class's tar's header, inside a class's images, at the end of a class's tar, before the
    end-of-archive blocks. The converter says the file is not a complete tar and to download it
    again (exit 1, one line); it was a tarfile.ReadError traceback, or (cut past the first
    header) a .beton without the images or classes cut off."""
    import shutil
    import tarfile

    from imagenet_ffcv import write
    roots, _ = three_layouts
    whole = (roots['tars'] / 'ILSVRC2012_img_train.tar').read_bytes()
    with tarfile.open(roots['tars'] / 'ILSVRC2012_img_train.tar') as tf:
        (_, _, _), (_, second, size), _ = [(m.name, m.offset_data, m.size) for m in tf]
        end_blocks = tf.offset
    for cut in (100, 700, second + size // 2, second + size, end_blocks):
        root = tmp_path / f'cut{cut}'
        shutil.copytree(roots['tars'], root)
        (root / 'ILSVRC2012_img_train.tar').write_bytes(whole[:cut])
        assert write.cli([f'--data-dir={root}', '--split=train', f'--out={tmp_path}']) == 1, cut
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and 'ILSVRC2012_img_train.tar' in err, (cut, err)
        assert 'not a complete tar' in err and 'download it again' in err, (cut, err)


def test_a_complete_tar_with_a_sparse_member_is_read(tmp_path):
    """GNU tar's sparse member (``tar -S``) declares its expanded size, larger than the bytes it
    takes: the tar is complete and reads (a check of members against the file's end refused
    it)."""
    import shutil
    if shutil.which('tar') is None:
        pytest.skip('no tar command to write a sparse member with')
    with open(tmp_path / 'holes.bin', 'wb') as f:
        f.seek(10 * 2 ** 20)
        f.write(b'x')
    subprocess.run(['tar', '-S', '-cf', 'sparse.tar', 'holes.bin'], cwd=tmp_path, check=True)
    assert (tmp_path / 'sparse.tar').stat().st_size < 2 ** 20
    assert ilsvrc.tar_members(tmp_path / 'sparse.tar') == [('holes.bin', 512, 10 * 2 ** 20 + 1)]


def test_the_val_tar_converts_without_the_train_tar(three_layouts):
    """Converting val from the raw tars needed ILSVRC2012_img_train.tar (138 GB) for the class
    list alone: without it, val is labelled with the 1,000 ILSVRC-2012 wnids in sorted order (the
    whole train split's list), with a warning; each image keeps its wnid. Train still needs it."""
    roots, wnids = three_layouts
    _, expected, _ = sources.load_split(roots['tars'], 'val')
    (roots['tars'] / 'ILSVRC2012_img_train.tar').unlink()
    with pytest.warns(UserWarning, match='ILSVRC2012_img_train.tar not found: val labelled with '
                                         'the 1,000 ILSVRC-2012 classes'):
        classes, samples, _ = sources.load_split(roots['tars'], 'val')
    assert len(classes) == 1000 and classes == sorted(classes)
    assert [(p, classes[l]) for p, l in samples] == [(p, wnids[l]) for p, l in expected]
    with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar: needed for the class'):
        sources.load_split(roots['tars'], 'train')


def test_val_images_the_label_file_lists_but_missing_are_counted_in_a_warning(three_layouts,
                                                                             recwarn):
    """Kaggle's val folder unzipped in part converted without a word (an image without a label
    is an error, a label without its image was nothing). The missing images of the train
    split's classes are counted; a subset of the classes (train/ and val/ cut alike) is no gap."""
    roots, wnids = three_layouts
    classes, complete, _ = sources.load_split(roots['kaggle'], 'val')
    assert not recwarn.list and len(complete) == 6
    cls_loc = roots['kaggle'] / 'ILSVRC' / 'Data' / 'CLS-LOC'
    shutil.rmtree(cls_loc / 'train' / wnids[2])
    for path, label in complete:
        if label == 2:
            os.unlink(path)
    assert len(sources.load_split(roots['kaggle'], 'val')[1]) == 4 and not recwarn.list
    gone = sorted((cls_loc / 'val').iterdir())[0]
    gone.unlink()
    _, samples, _ = sources.load_split(roots['kaggle'], 'val')
    assert len(samples) == 3
    assert [str(w.message) for w in recwarn.list] == [
        f'{cls_loc / "val"}: 1 of the 4 images LOC_val_solution.csv labels are not there '
        f'({gone.stem}): the val split is incomplete (an archive unpacked in part?)']


def test_hidden_tars_in_the_train_tar_are_not_classes(three_layouts):
    """A train tar packed on macOS holds an AppleDouble ``._<wnid>.tar`` beside each class's
    tar: it took a class index, shifting every later class (val labelled wrong) and failing
    train as a tar cut short. Hidden members are left out, as hidden folders are."""
    import io
    import tarfile
    roots, wnids = three_layouts
    expected = {split: sources.load_split(roots['tars'], split) for split in ('train', 'val')}
    with tarfile.open(roots['tars'] / 'ILSVRC2012_img_train.tar', 'a') as outer:
        info = tarfile.TarInfo(f'._{wnids[1]}.tar')
        info.size = 4
        outer.addfile(info, io.BytesIO(b'\x00\x05\x16\x07'))
    for split in ('train', 'val'):
        classes, samples, _ = sources.load_split(roots['tars'], split)
        assert classes == wnids == expected[split][0]
        assert samples == expected[split][1]


def test_raw_tars_with_devkit_labels_match_the_csv_labels(three_layouts, tmp_path):
    """Without LOC_val_solution.csv the val labels come from the devkit archive (meta.mat + the
    ground-truth list in val-file order), read in place; they equal the CSV's labels."""
    import io
    import shutil
    import tarfile

    import numpy as np
    import scipy.io
    roots, wnids = three_layouts
    expected = sources.load_split(roots['tars'], 'val')[1]
    devkit_root = tmp_path / 'tars_devkit'
    shutil.copytree(roots['tars'], devkit_root)
    (devkit_root / 'LOC_val_solution.csv').unlink()
    with pytest.raises(FileNotFoundError, match='ILSVRC2012_devkit_t12.tar.gz'):
        sources.load_split(devkit_root, 'val')
    # ILSVRC2012_ID 1..3 for the three classes (leaves), 1001 for a parent synset (not a class)
    synsets = np.zeros(4, dtype=[('ILSVRC2012_ID', 'O'), ('WNID', 'O'), ('words', 'O'),
                                 ('gloss', 'O'), ('num_children', 'O')])
    for i, (sid, wnid, children) in enumerate([(3, wnids[2], 0), (1, wnids[0], 0),
                                               (1001, 'n00001740', 2), (2, wnids[1], 0)]):
        synsets[i] = (sid, wnid, wnid, '', children)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {'synsets': synsets})
    truth = {}
    for w in wnids:
        for f in (SAMPLE / 'val' / w).glob('*.JPEG'):
            truth[int(f.stem.rsplit('_', 1)[1])] = wnids.index(w) + 1
    lines = '\n'.join(str(truth.get(i, 1 + i % 3)) for i in range(1, max(truth) + 1))

    def add(tf, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))

    with tarfile.open(devkit_root / 'ILSVRC2012_devkit_t12.tar.gz', 'w:gz') as tf:
        add(tf, 'ILSVRC2012_devkit_t12/data/meta.mat', meta.getvalue())
        add(tf, 'ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt',
            lines.encode() + b'\n')
    listed = len(lines.split())  # every ID up to the sample's largest; the val tar holds 6
    with pytest.warns(UserWarning, match=f'{listed - 6} of the {listed} images '
                                         r'ILSVRC2012_devkit_t12\.tar\.gz labels are not there'):
        classes, samples, _ = sources.load_split(devkit_root, 'val')
    assert classes == wnids
    assert [(p.split('::')[1], l) for p, l in samples] == \
        [(p.split('::')[1], l) for p, l in expected]
    # a devkit cut short, or an HTML page saved under its name: one error naming it (tracebacks)
    devkit = (devkit_root / 'ILSVRC2012_devkit_t12.tar.gz').read_bytes()
    for damaged in (devkit[:len(devkit) // 2], b'<html><body>Not Found</body></html>\n'):
        (devkit_root / 'ILSVRC2012_devkit_t12.tar.gz').write_bytes(damaged)
        with pytest.raises(ValueError, match='ILSVRC2012_devkit_t12.tar.gz: does not read as the '
                                             'ILSVRC-2012 devkit archive.*Download it again'):
            sources.load_split(devkit_root, 'val')


def test_a_class_left_in_its_tar_is_refused_and_loose_files_are_named(tmp_path):
    """A train split with one class still in its <wnid>.tar (extraction not finished) is refused,
    naming the tar and how to extract it (the class was left out without a word, and the classes
    after it took other indices); a tar whose folder exists is an extracted class's leftover.
    Images lying in a split folder beside its class folders (an interrupted valprep.sh) are left
    out with a warning naming them (silently before)."""
    photos = sorted((SAMPLE / 'train').glob('*/*.JPEG'))[:4]
    for split in ('train', 'val'):
        for wnid in ('n01440764', 'n03417042'):
            (tmp_path / split / wnid).mkdir(parents=True)
            for p in photos[:2]:
                (tmp_path / split / wnid / p.name).write_bytes(p.read_bytes())
    (tmp_path / 'train' / 'n02102040.tar').write_bytes(b'a class tar')
    with pytest.raises(ValueError, match=r'n02102040.tar not extracted: the class would be '
                                         r'missing.*mkdir n02102040 && tar xf n02102040.tar'):
        sources.find_classes(tmp_path / 'train')
    (tmp_path / 'train' / 'n02102040').mkdir()
    (tmp_path / 'train' / 'n02102040' / photos[2].name).write_bytes(photos[2].read_bytes())
    wnids = ['n01440764', 'n02102040', 'n03417042']
    assert sources.find_classes(tmp_path / 'train') == wnids
    # ImageNet's own train tar left beside its extracted classes is no class: named, not refused
    (tmp_path / 'train' / 'ILSVRC2012_img_train.tar').write_bytes(b'the whole download')
    assert sources.find_classes(tmp_path / 'train') == wnids
    with pytest.warns(UserWarning, match=r'ILSVRC2012_img_train.tar, n02102040.tar; move images'):
        assert len(sources.list_samples(tmp_path / 'train', wnids)) == 5
    for name in ('ILSVRC2012_val_00000007.JPEG', 'ILSVRC2012_val_00000009.JPEG'):
        (tmp_path / 'val' / name).write_bytes(photos[3].read_bytes())
    with pytest.warns(UserWarning, match=r'2 file\(s\) in the split folder itself.*left out \(no '
                                         r'class\): ILSVRC2012_val_00000007.JPEG, ILSVRC2012_val_'):
        samples = sources.list_samples(tmp_path / 'val', ['n01440764', 'n03417042'])
    assert len(samples) == 4
    # no image among them (ImageNet-A's and -R's README.txt): named, with no advice on images
    for name in ('ILSVRC2012_val_00000007.JPEG', 'ILSVRC2012_val_00000009.JPEG'):
        (tmp_path / 'val' / name).unlink()
    (tmp_path / 'val' / 'README.txt').write_text('about this test set')
    with pytest.warns(UserWarning) as warned:
        sources.list_samples(tmp_path / 'val', ['n01440764', 'n03417042'])
    assert [str(w.message) for w in warned] == [
        f'{tmp_path / "val"}: 1 file(s) in the split folder itself, outside the class folders, '
        f'left out (no class): README.txt']


def test_symlinked_class_folders_and_looping_links_are_refused_or_reported(tmp_path, capsys):
    root = tmp_path / 'data'
    photos = sorted((SAMPLE / 'train').glob('*/*.JPEG'))[:6]
    for i, wnid in enumerate(('n01', 'n02')):
        (root / 'train' / wnid).mkdir(parents=True)
        for photo in photos[3 * i:3 * i + 3]:
            (root / 'train' / wnid / photo.name).symlink_to(photo)
    (root / 'train' / 'n01' / 'loop.JPEG').symlink_to(root / 'train' / 'n01' / 'loop.JPEG')
    # without an image name too (a link to a folder of images on a disk not mounted, or a loop):
    # they were left out without a word
    (root / 'train' / 'n02' / 'photos').symlink_to(tmp_path / 'unmounted' / 'photos')
    (root / 'train' / 'n02' / 'loop').symlink_to(root / 'train' / 'n02' / 'loop')
    with pytest.warns(UserWarning, match=re.escape(
            '3 entries are neither readable files nor folders (broken or looping symbolic links: '
            'to a disk not mounted?), so the images they lead to are left out: ') + '.*loop.JPEG, '
            '.*n02/loop, .*n02/photos$'):
        samples = sources.list_samples(root / 'train', ['n01', 'n02'])
    assert [label for _, label in samples] == [0, 0, 0, 1, 1, 1]  # the others keep their labels
    (root / 'train' / 'n03').symlink_to(root / 'train' / 'n01')  # one class folder twice
    with pytest.raises(ValueError, match='class folders n01 and n03 are the same folder'):
        sources.list_samples(root / 'train', ['n01', 'n02', 'n03'])
    assert write.cli(['--data-dir', str(root), '--split', 'train']) == 1
    assert 'are the same folder' in capsys.readouterr().err


@pytest.mark.parametrize('linked_split', [False, True])
def test_a_link_to_a_folder_holding_the_class_folders_is_named_not_walked(tmp_path, linked_split):
    """A link in a class folder to the data set's folder, or to the val split's, took the val
    split's images into that class, and one to the split's folder was named by the repeats under
    it, not itself; the same with train/ itself a link to another disk."""
    root = tmp_path / 'data'
    photos = sorted((SAMPLE / 'train').glob('*/*.JPEG'))[:4]
    for i, (split, wnid) in enumerate((('train', 'n01'), ('train', 'n02'), ('val', 'n01'),
                                       ('val', 'n02'))):
        (root / split / wnid).mkdir(parents=True)
        (root / split / wnid / photos[i].name).symlink_to(photos[i])
    if linked_split:
        (root / 'train').rename(tmp_path / 'other_disk')
        (root / 'train').symlink_to(tmp_path / 'other_disk')
    for name, target in (('data', root), ('split', root / 'train'), ('val', root / 'val'),
                         ('top', Path('/'))):
        (root / 'train' / 'n01' / name).symlink_to(target)
    with pytest.warns(UserWarning, match=r'4 symbolic link\(s\) to folders or images listed already'
                                         r'.*left out so that no image is listed twice or with '
                                         r'another label: \S*train/n01/data, \S*train/n01/split, '
                                         r'\S*train/n01/top, \S*train/n01/val$'):
        samples = sources.list_samples(root / 'train', ['n01', 'n02'])
    assert [(Path(path).name, label) for path, label in samples] == [(photos[0].name, 0),
                                                                     (photos[1].name, 1)]


def test_subfolders_are_their_class_hidden_folders_are_no_class_and_broken_links_are_refused(
        tmp_path):
    """A class folder's subfolders hold its images too (as torchvision's ImageFolder; they were
    left out without a word), each folder once (a link to another class is left out with a
    warning: its images would carry two labels); hidden folders (Jupyter's .ipynb_checkpoints)
    and files (macOS's ._ files) are no class and no image (.ipynb_checkpoints was class 0, every
    label shifted by one); a broken link in train/ is refused (a class folder on a disk that is
    not mounted dropped out, shifting the classes after it); one in val/ is named as such (it was
    "a class with no folder here"), its class left out."""
    train = tmp_path / 'data' / 'train'
    photos = iter(sorted((SAMPLE / 'train').glob('*/*.JPEG')))
    for name in ('a/x.JPEG', 'a/2019/y.JPEG', 'a/2019/deeper/w.JPEG', 'a/.hidden/z.JPEG',
                 'b/v.JPEG', '.ipynb_checkpoints/u.JPEG'):
        (train / name).parent.mkdir(parents=True, exist_ok=True)
        (train / name).symlink_to(next(photos))
    (train / 'a' / '._x.JPEG').write_bytes(b'\0\5\26\7')  # AppleDouble: not a JPEG
    (train / 'a' / 'also_b').symlink_to(train / 'b')
    assert sources.find_classes(train) == ['a', 'b']
    with pytest.warns(UserWarning) as caught:
        samples = sources.list_samples(train, ['a', 'b'])
    assert [(str(Path(p).relative_to(train)), label) for p, label in samples] == [
        ('a/2019/deeper/w.JPEG', 0), ('a/2019/y.JPEG', 0), ('a/x.JPEG', 0), ('b/v.JPEG', 1)]
    said = ' '.join(str(w.message) for w in caught)
    assert 'hidden folder(s) .ipynb_checkpoints left out' in said and 'also_b' in said
    assert '._x' not in said
    (train / 'c').symlink_to(tmp_path / 'not_mounted')
    with pytest.raises(ValueError, match=r'train: c cannot be read \(a broken or looping'):
        sources.find_classes(train)
    val = tmp_path / 'data' / 'val'
    (val / 'a').mkdir(parents=True)
    (val / 'a' / 'x.JPEG').symlink_to(next(photos))
    (val / 'b').symlink_to(tmp_path / 'not_mounted')
    with pytest.warns(UserWarning) as caught:
        assert [label for _, label in sources.list_samples(val, ['a', 'b'])] == [0]
    assert [str(w.message) for w in caught] == [
        f'1 entry is neither a readable file nor a folder (a broken or looping symbolic link: to '
        f'a disk not mounted?), so the images it leads to are left out: {val / "b"}']


def test_a_link_into_another_class_leaves_each_image_in_its_own_class(tmp_path):
    """A link in class a to class b's real subfolder gave that subfolder's images label a, and
    its real place was left out ("a link ... listed already"); a link in b to a file of a listed
    it twice, with both labels, without a word. The real places keep their images; the links are
    left out, named in a warning. Links to images outside the split (a subset made of links),
    or to files the split does not list at their place (in a hidden folder, of another
    extension), are images as before."""
    train = tmp_path / 'data' / 'train'
    photos = iter(sorted((SAMPLE / 'train').glob('*/*.JPEG')))
    for name in ('a/x.JPEG', 'b/sub/y.JPEG', 'b/z.JPEG'):
        (train / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(next(photos), train / name)
    (train / 'a' / 'shortcut').symlink_to(train / 'b' / 'sub')  # before b/sub, by name
    (train / 'b' / 'also_x.JPEG').symlink_to(train / 'a' / 'x.JPEG')
    (train / 'b' / 'outside.JPEG').symlink_to(next(photos))
    for name in ('b/.store/0f3a', 'b/blob.bin'):  # not listed at their place: the links are
        (train / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(next(photos), train / name)
    (train / 'a' / 'stored.JPEG').symlink_to(train / 'b' / '.store' / '0f3a')
    (train / 'a' / 'blob.JPEG').symlink_to(train / 'b' / 'blob.bin')
    with pytest.warns(UserWarning) as caught:
        samples = sources.list_samples(train, ['a', 'b'])
    caught = [w for w in caught if 'symbolic link' in str(w.message)]  # not blob.bin's
    assert [(str(Path(p).relative_to(train)), label) for p, label in samples] == [
        ('a/blob.JPEG', 0), ('a/stored.JPEG', 0), ('a/x.JPEG', 0), ('b/outside.JPEG', 1),
        ('b/sub/y.JPEG', 1), ('b/z.JPEG', 1)]
    [said] = [str(w.message) for w in caught]
    assert said.startswith('2 symbolic link(s) to folders or images listed already or at their '
                           'own place') and 'a/shortcut' in said and 'b/also_x.JPEG' in said


def test_out_inside_the_input_tree_is_refused(tmp_path, capsys):
    import shutil
    root = tmp_path / 'data'
    shutil.copytree(SAMPLE / 'val', root / 'train')
    out = root / 'train' / 'betons' / 'train.beton'
    assert write.cli(['--data-dir', str(root), '--split', 'train', '--out', str(out)]) == 1
    assert 'is inside the input folder' in capsys.readouterr().err
    assert not out.parent.exists()


def test_an_existing_out_is_refused_before_any_work_unless_overwrite(tmp_path, capsys):
    """The val split written over the train .beton (a wrong --out, or two data sets' default
    names) replaced it, after the whole conversion, without a word."""
    out = tmp_path / 'train.beton'
    out.write_bytes(b'hours of converting')
    os.utime(out, (1.7e9, 1.7e9))
    args = ['--data-dir', str(SAMPLE), '--split', 'val', '--max-res', '32', '--num-workers', '1',
            '--out', str(out)]
    with pytest.MonkeyPatch.context() as patched:  # before any work: no image listed
        patched.setattr(write, 'load_split', lambda *a: pytest.fail('the split was read'))
        assert write.cli(args) == 1
    when = time.strftime('%Y-%m-%d %H:%M', time.localtime(1.7e9))
    assert capsys.readouterr().err.endswith(f': --out {out} exists (0.0 MB, modified {when}): '
                                            'give --overwrite to replace it, or another --out\n')
    assert out.read_bytes() == b'hours of converting' and list(tmp_path.iterdir()) == [out]
    assert write.cli(args + ['--overwrite']) == 0 and betons.num_samples(out) == 100


def test_an_unwritable_output_folder_is_a_clear_error_before_any_work(tmp_path, capsys):
    """An immutable folder (chattr +i: refused even to root, as the tests run)."""
    folder = tmp_path / 'readonly'
    folder.mkdir()
    if subprocess.run(['chattr', '+i', str(folder)], capture_output=True).returncode != 0:
        pytest.skip('chattr +i is not available on this filesystem')
    try:
        code = write.cli(['--data-dir', str(SAMPLE), '--split', 'val', '--max-res', '32',
                                '--out', str(folder / 'val.beton'), '--num-workers', '1'])
    finally:
        subprocess.run(['chattr', '-i', str(folder)])
    assert code == 1
    assert f'{folder}: cannot write the .beton there' in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_a_split_of_loose_images_says_how_to_label_them_and_other_files_are_named(tmp_path):
    """ImageNet val as extracted from its tar (images in val/ itself, no class folders): an error
    naming valprep and the layouts that label them, not "no images found"; files with another
    extension in a class folder are left out with a warning naming them."""
    root = tmp_path / 'data'
    (root / 'train' / 'n01').mkdir(parents=True)
    (root / 'val').mkdir()
    for i, src in enumerate(sample_images(3)):
        Image.open(src).save(root / 'train' / 'n01' / f'{i}.JPEG')
        Image.open(src).save(root / 'val' / f'ILSVRC2012_val_{i:08d}.JPEG')
    Image.open(src).save(root / 'train' / 'n01' / 'clip.gif')
    (root / 'train' / 'n01' / '.DS_Store').write_bytes(b'')
    classes = sources.find_classes(root / 'train')
    with pytest.raises(ValueError, match=r'3 images lie in the folder itself \(ILSVRC2012_val_0+'
                                         r'\.JPEG, .*valprep\.sh.*--layout tars.*--layout kaggle'):
        sources.list_samples(root / 'val', classes)
    # Kaggle's tree given by its CLS-LOC folder: the advice names the folder to give (it said
    # --layout kaggle, which with the same --data-dir looked for CLS-LOC/ILSVRC/Data/CLS-LOC)
    cls_loc = tmp_path / 'kaggle' / 'ILSVRC' / 'Data' / 'CLS-LOC'
    shutil.copytree(root, cls_loc)
    with pytest.raises(ValueError, match=f"with LOC_val_solution.csv \\(--data-dir "
                                         f"{tmp_path / 'kaggle'} --layout kaggle\\)$"):
        sources.list_samples(cls_loc / 'val', classes)
    flat_train = tmp_path / 'flat' / 'train'  # a train split of loose images: no val advice
    flat_train.mkdir(parents=True)
    Image.open(src).save(flat_train / 'a.JPEG')
    with pytest.raises(ValueError, match=r'1 images lie in the folder itself .*Move them into one '
                                         r'folder per class, or convert ImageNet from the raw tars'):
        sources.find_classes(flat_train)
    (root / 'train' / '.DS_Store').write_bytes(b'')  # hidden, in the split folder: no word
    with pytest.warns(UserWarning) as caught:
        samples = sources.list_samples(root / 'train', classes)
    assert [str(w.message).split(' left out: ')[1].split(';')[0] for w in caught] == [
        str(root / 'train' / 'n01' / 'clip.gif')]
    assert [p.rsplit('/', 1)[-1] for p, _ in samples] == ['0.JPEG', '1.JPEG', '2.JPEG']


def test_images_under_a_folder_whose_name_holds_the_tar_separator_are_read_as_files(tmp_path):
    """'::' separates a tar from its member in the tars layout's references; a folder named
    'run::1' is no tar: its images are read (they failed as unreadable before)."""
    folder = tmp_path / 'run::1' / 'train' / 'n01'
    folder.mkdir(parents=True)
    Image.open(sample_images(1)[0]).save(folder / 'a.JPEG')
    [(path, label)] = sources.list_samples(folder.parent, ['n01'])
    assert images.load_image(path, max_res=32).shape[0] == 32 and label == 0


def test_an_out_that_is_a_folder_gets_the_default_name_in_it_or_an_error_before_any_work(
        tmp_path, monkeypatch):
    """--out naming an existing folder: the CLI writes {split}_{max_res}.beton in it; the library
    (given a folder as the file) refuses before reading an image, where the rename at the end
    used to fail after the whole conversion."""
    folder = tmp_path / 'betons'
    folder.mkdir()
    args = write.parse_args(['--data-dir', str(SAMPLE), '--split', 'val', '--max-res', '32',
                             '--out', str(folder)])
    assert args.out == str(folder / 'val_32.beton')
    def no_image(*args):  # an Exception, as a bad file raises: a BaseException kills ffcv's
        raise AssertionError('an image was read')  # worker, and its writer waits for ever
    monkeypatch.setattr(writer, 'load_image', no_image)
    samples = sources.list_samples(SAMPLE / 'val', sources.find_classes(SAMPLE / 'train'))
    with pytest.raises(errors.InputError, match=f'{folder} is a folder: give the path of the'):
        writer.write_beton(samples, folder, max_res=32, num_workers=1)
    assert list(folder.iterdir()) == []
    # --out a link to a .beton on another disk: the new file replaced the link, and the jobs that
    # read the target went on with its old data
    target = tmp_path / 'fast' / 'val.beton'
    target.parent.mkdir()
    target.write_bytes(b'old')
    (folder / 'val.beton').symlink_to(target)
    with pytest.raises(errors.InputError, match=f'val.beton is a symbolic link \\(to {target}\\): '
                                                f'give the path of the file itself, {target}'):
        writer.write_beton(samples, folder / 'val.beton', max_res=32, num_workers=1)
    assert (folder / 'val.beton').is_symlink() and target.read_bytes() == b'old'


def test_an_out_no_file_can_take_the_place_of_is_refused_before_any_work(tmp_path, monkeypatch):
    """A FIFO (or a device: --out /dev/null as root was replaced by a .beton), a path under a
    file, a name whose files beside it would be another .beton's, and a name too long for the
    temporaries and the files beside it (it failed blaming the folder): each an InputError
    naming the cause, before any image is read, and nothing changed."""
    def no_image(*args):
        raise AssertionError('an image was read')
    monkeypatch.setattr(writer, 'load_image', no_image)
    samples = sources.list_samples(SAMPLE / 'val', sources.find_classes(SAMPLE / 'train'))
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    with pytest.raises(errors.InputError, match=f'^{fifo} is not a regular file \\(a device, a '
                                                'FIFO or a socket\\): give the path'):
        writer.write_beton(samples, fifo, max_res=32, num_workers=1)
    with pytest.raises(errors.InputError, match=f'^{fifo} is not a regular file'):
        files.write_text_atomic(fifo, 'text')  # every atomic write: a class list, a checkpoint
    assert fifo.is_fifo()
    (tmp_path / 'notes.txt').write_text('a file')
    under = tmp_path / 'notes.txt' / 'betons' / 'val.beton'
    with pytest.raises(errors.InputError, match=f'^{under}: {tmp_path / "notes.txt"} is a file, '
                                                'not a folder; give another --out$'):
        writer.write_beton(samples, under, max_res=32, num_workers=1)
    (tmp_path / 'val.beton').write_bytes(b'another')  # val.classes.tsv is its class list
    for out in ('val', 'val.BETON', 'val.ffcv'):  # (any case; ffcv-imagenet's suffix too)
        with pytest.raises(errors.InputError, match=f'^{tmp_path / out}: {tmp_path / "val.beton"} '
                                                    'is there, and the files written beside a '
                                                    r'.beton \(val.classes.tsv, ...\)'):
            writer.write_beton(samples, tmp_path / out, max_res=32, num_workers=1)
    os.mkfifo(tmp_path / 'x.classes.tsv')  # a file written beside it: refused before, not after
    with pytest.raises(errors.InputError, match='x.classes.tsv is not a regular file'):
        writer.write_beton(samples, tmp_path / 'x.beton', max_res=32, num_workers=1)
    for long in (tmp_path / ('a' * 236 + '.beton'),  # a legal name; its temporaries are not
                 tmp_path / ('a' * 300 + '.beton')):  # no legal name (it failed in is_dir)
        with pytest.raises(errors.InputError, match=f'^{long}: the name is too long: the '
                                                    'converter writes .*, [23][0-9][0-9] bytes, '
                                                    'and this folder takes names of at most '
                                                    '255; give a name at least [0-9]+ bytes '
                                                    'shorter$'):
            writer.write_beton(samples, long, max_res=32, num_workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['fifo', 'notes.txt', 'val.beton',
                                                          'x.classes.tsv']


def test_each_beton_name_has_its_own_files_beside_it(tmp_path, capsys):
    """The files beside a .beton were named by Path.stem, cut at the last dot:
    imagenet-1.0-train and imagenet-1.0-val shared imagenet-1.classes.tsv and
    imagenet-1.holdout.json, and the trainer refused the pair as written with --split val."""
    assert files.beside_beton('d/train_256.beton', '.classes.tsv') == Path(
        'd/train_256.classes.tsv')
    assert files.beside_beton('d/imagenet-1.0-val', '.holdout.json') == Path(
        'd/imagenet-1.0-val.holdout.json')
    assert files.beside_beton('d/train_500_0.50_90.FFCV', '.classes.tsv') == Path(
        'd/train_500_0.50_90.classes.tsv')  # ffcv-imagenet's suffix, as Path.stem cut it
    assert files.beside_beton('d/.beton', '.classes.tsv') == Path('d/.beton.classes.tsv')
    outs = {split: tmp_path / f'imagenet-1.0-{split}' for split in ('train', 'val')}
    for split, out in outs.items():
        assert write.cli(['--data-dir', str(SAMPLE), '--split', split, '--holdout', '0.25',
                          '--max-res', '32', '--num-workers', '1', '--out', str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f'imagenet-1.0-{split}{suffix}' for split in ('train', 'val')
        for suffix in ('', '.classes.tsv', '.holdout.json')]
    assert betons.num_classes(outs['train'], outs['val']) == 10  # their holdouts checked
    old = tmp_path / 'old' / 'val.v1'  # converted when the class list was named by Path.stem
    old.parent.mkdir()
    shutil.copy(outs['val'], old)
    shutil.copy(tmp_path / 'imagenet-1.0-val.classes.tsv', old.parent / 'val.classes.tsv')
    with pytest.warns(UserWarning, match=r'val.v1: no class list beside it \(val.v1.classes.tsv,'
                                         r'.* \(val.classes.tsv, there, is the name an older '
                                         r"imagenet-ffcv-write gave it: rename it if it is this "
                                         r"\.beton's\)"):
        betons.num_classes(old)


def test_the_writer_starts_a_process_per_core_it_may_use_not_per_core_of_the_machine(
        tmp_path, monkeypatch):
    """num_workers 0: as many writer processes as this process's CPU affinity allows (taskset,
    cgroups, SLURM), not os.cpu_count()."""
    started = []
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0})
    real = writer._Writer
    monkeypatch.setattr(writer, '_Writer', lambda path, fields, num_workers: (
        started.append(num_workers) or real(path, fields, num_workers=num_workers)))
    samples = sources.list_samples(SAMPLE / 'val', sources.find_classes(SAMPLE / 'train'))[:3]
    stats = writer.write_beton(samples, tmp_path / 'val.beton', max_res=16, num_workers=0)
    assert started == [1] and stats['images'] == 3 and os.cpu_count() >= 1


WRITE_WITH_A_BAD_FILE = """
import sys
from imagenet_ffcv import sources, writer
samples = sources.list_samples(sys.argv[1], sources.find_classes(sys.argv[1]))
stats = writer.write_beton(samples, sys.argv[2], max_res=32, num_workers=1, skip_unreadable=True)
print(stats['images'], stats['skipped'])
"""


@pytest.mark.parametrize('write_mode', ['raw', 'jpg', 'proportion'])
def test_an_image_whose_record_ffcv_cannot_store_is_skipped_and_named(tmp_path, write_mode):
    """A panorama of 12,000 x 256 px: its raw record (9.2 MB) is larger than a page of the .beton
    (8 MiB), and ffcv's writer raised ValueError in its process, ending the whole write without
    naming the file; an image 65,501 px wide, more than a JPEG holds: OpenCV's error did the same.
    Each is now skipped and listed as a bad file is, with what to do; the JPEG of the panorama
    fits, and is written (also where --write-mode proportion draws raw for it: here always)."""
    small_split(tmp_path / 'data', 4)
    train = tmp_path / 'data' / 'train'
    wide, wider = train / 'n00' / 'wide.png', train / 'n01' / 'wider.png'
    Image.fromarray(np.full((256, 12_000, 3), 90, np.uint8)).save(wide)
    Image.fromarray(np.full((8, 65_501, 3), 90, np.uint8)).save(wider)
    samples = sources.list_samples(train, sources.find_classes(train))
    stats = writer.write_beton(samples, tmp_path / 'out.beton', max_res=256, num_workers=1,
                               write_mode=write_mode, compress_probability=0.0,
                               skip_unreadable=True)
    skipped = dict(stats['skipped_files'])
    assert skipped.pop(str(wider)) == ('65501 x 8 px after the resize: a side over 65,500 px, more '
                                       'than a record holds; crop it')
    if write_mode == 'raw':
        assert skipped.pop(str(wide)) == (
            '12000 x 256 px after the resize: its record (raw, 8.8 MiB) is larger than a page of '
            'the .beton (8 MiB); crop it, or write with --write-mode jpg')
    assert skipped == {}
    assert stats['images'] == (4 if write_mode == 'raw' else 5)
    records = verify.records(tmp_path / 'out.beton')
    assert sorted(records['width']) == [30] * 4 + ([12_000] if write_mode != 'raw' else [])
    if write_mode == 'proportion':  # raw pixels, the panorama's JPEG
        assert sorted(records['mode']) == [0] + [1] * 4


def test_a_bad_file_whose_name_is_not_utf8_is_skipped_and_reported_not_a_hang(tmp_path):
    """A file that does not decode, named in Latin-1 (a name that is not UTF-8, as in old zip
    files): skipped and listed in the report, its name's byte as an escape; reporting it used
    to kill ffcv's worker, and ffcv's writer then waits for ever (a subprocess, with a limit)."""
    root = tmp_path / 'train'
    (root / 'n01').mkdir(parents=True)
    Image.open(sample_images(1)[0]).save(root / 'n01' / 'ok.JPEG')
    with open(os.path.join(os.fsencode(root / 'n01'), b'caf\xe9.JPEG'), 'wb') as f:
        f.write(b'not an image')
    proc = subprocess.run([PYTHON, '-c', WRITE_WITH_A_BAD_FILE, str(root),
                           str(tmp_path / 'out.beton')], capture_output=True, text=True,
                          env=run_env(), timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ['1', '1'], proc.stderr[-3000:]
    report = (tmp_path / 'out.skipped.tsv').read_text()
    assert report.startswith(f'{root}/n01/caf\\xe9.JPEG\tUnidentifiedImageError'), report
    assert '\\udce9' not in report and report.count('caf\\xe9.JPEG') == 2  # the reason as the path


def test_a_tar_member_that_is_no_image_is_named_by_its_reference(tmp_path):
    """PIL's error for a tar member it cannot identify named '<_io.BytesIO object at 0x...>' in
    the skipped-files report; it names the member's reference (tar, class tar, member)."""
    import io
    import tarfile
    with tarfile.open(tmp_path / 'n01.tar', 'w') as tf:
        info = tarfile.TarInfo('bad.JPEG')
        info.size = 12
        tf.addfile(info, io.BytesIO(b'not an image'))
    (name, offset, size), = ilsvrc.tar_members(tmp_path / 'n01.tar')
    ref = ilsvrc.tar_ref(tmp_path / 'n01.tar', name, offset, size)
    with pytest.raises(OSError, match=f'cannot identify image file .*n01.tar::bad.JPEG@{offset}') \
            as info:
        images.load_image(ref, 32)
    assert 'BytesIO' not in str(info.value)


# The converter's command, with one image that ends the writer process (not the command's own,
# which reads a few images for its space estimate) that takes it: argv[1] 'kill', the SIGKILL of
# the kernel's out-of-memory killer; 'disk-full', an OSError outside the decoding; 'exit-0', an
# exit with status 0; 'slow': none, each image taking 20 ms; 'forkserver': none, Python's default
# start method forkserver (the default from Python 3.14 on).
WRITE_WITH_A_WORKER_THAT_ENDS = """
import errno, multiprocessing, os, signal, sys, time
from imagenet_ffcv import records, write, writer
how, command = sys.argv[1], os.getpid()
# Ctrl-C raises KeyboardInterrupt, as in a terminal, also where pytest runs as a background job
# (a shell starts those with SIGINT ignored, and Python then leaves it ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
real_load, real_encode = records.load_image, records.encode_jpeg
if how == 'forkserver':
    multiprocessing.set_start_method('forkserver', force=True)
prepare = writer._Writer.prepare
def prepare_and_say(self):  # the name of the records' shared table in /dev/shm
    prepare(self)
    print('table', self.metadata_sm.name, flush=True)
writer._Writer.prepare = prepare_and_say
def load_image(path, max_res):
    if how == 'kill' and path.endswith('n01/0003.png') and os.getpid() != command:
        os.kill(os.getpid(), signal.SIGKILL)
    if how == 'exit-0' and path.endswith('n01/0003.png') and os.getpid() != command:
        os._exit(0)
    if how == 'slow':
        time.sleep(0.02)
    return real_load(path, max_res)
def encode_jpeg(rgb, **kwargs):
    if how == 'disk-full' and rgb[0, 0, 0] == 3 and os.getpid() != command:
        raise OSError(errno.ENOSPC, 'No space left on device')
    return real_encode(rgb, **kwargs)
records.load_image, records.encode_jpeg = load_image, encode_jpeg
sys.exit(write.cli(sys.argv[2:]))
"""


def small_split(root, images: int):
    """``images`` PNGs of 20 x 30 px in root/train/n00 and n01 (alternately), hard links to 8
    files of one value each in root/values (image i: value i % 8), named by their index
    (``0003.png``)."""
    (root / 'values').mkdir(parents=True)
    values = [root / 'values' / f'{v}.png' for v in range(8)]
    for v, path in enumerate(values):
        Image.fromarray(np.full((20, 30, 3), v, np.uint8)).save(path)
    for i in range(images):
        folder = root / 'train' / f'n{i % 2:02d}'
        folder.mkdir(parents=True, exist_ok=True)
        os.link(values[i % 8], folder / f'{i:04d}.png')


@pytest.mark.parametrize('how', ['kill', 'disk-full', 'exit-0'])
def test_a_writer_process_that_ends_stops_the_command_not_a_hang(tmp_path, how):
    """A writer process killed (the out-of-memory killer's SIGKILL), stopped by an error outside
    the image decoding (a full disk) or ended with exit status 0 before its work was done: the
    command ends with exit 1, naming how the process ended,
    and leaves no .beton and no temporary behind. ffcv's writer waited for ever for that
    process's images, and then the command waited at its exit for the queue of the chunks no
    worker took, which outgrows a pipe's 64 KiB with 6,000 images (2.4 KB a chunk of 100)."""
    small_split(tmp_path / 'data', 6000)
    out = tmp_path / 'betons'
    out.mkdir()
    proc = subprocess.run([PYTHON, '-c', WRITE_WITH_A_WORKER_THAT_ENDS, how,
                           f'--data-dir={tmp_path / "data"}', '--split=train', f'--out={out}',
                           '--num-workers=2'], capture_output=True, text=True, env=run_env(),
                          timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last.split(': ', 1)[0] in ('imagenet-ffcv-write', 'python -m imagenet_ffcv.write'), last
    expected = {'kill': 'was killed by SIGKILL (often the kernel\'s out-of-memory killer',
                'disk-full': 'ended with exit code 1 (its error is printed above)',
                'exit-0': '1 writer process(es) ended with exit code 0 before their work was done'
                }[how]
    assert expected in last and 'nothing was written' in last, last
    if how == 'disk-full':
        assert 'No space left on device' in proc.stderr  # the worker's own traceback
    assert os.listdir(out) == []


def test_the_writer_forks_its_processes_whatever_the_default_start_method(tmp_path):
    """With forkserver as Python's start method (Linux's default from Python 3.14 on) the
    converter writes the split: its writer processes are forked, as ffcv's writer expects."""
    small_split(tmp_path / 'data', 40)
    proc = subprocess.run([PYTHON, '-c', WRITE_WITH_A_WORKER_THAT_ENDS, 'forkserver',
                           f'--data-dir={tmp_path / "data"}', '--split=train', f'--out={tmp_path}',
                           '--num-workers=2'], capture_output=True, text=True, env=run_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ': 40 images, 2 classes' in proc.stdout, proc.stdout


def converter_in_its_group(data_dir, out, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """The converter of the train split of ``data_dir`` into ``out`` (WRITE_WITH_A_WORKER_THAT_ENDS
    'slow', 2 writer processes) in a process group of its own, as a job's command; its stdout
    piped, whose first line names the records' table in /dev/shm."""
    return subprocess.Popen([PYTHON, '-c', WRITE_WITH_A_WORKER_THAT_ENDS, 'slow',
                             f'--data-dir={data_dir}', '--split=train', f'--out={out}',
                             '--overwrite', '--num-workers=2'], env=run_env(),
                            stdout=subprocess.PIPE, stderr=stderr, text=True,
                            start_new_session=True)


def test_a_converter_killed_with_its_processes_leaves_nothing_in_dev_shm(tmp_path):
    """The converter and all its processes killed at once (SIGKILL to its process group, as a
    job's end or a container's kill does): the records' shared table leaves no file in /dev/shm
    (a name ffcv's writer kept until its end, which multiprocessing's resource tracker, killed
    too, could not remove: 24 bytes an image, 30 MB for ImageNet's train split, until reboot)."""
    small_split(tmp_path / 'data', 2000)
    command = converter_in_its_group(tmp_path / 'data', tmp_path)
    try:
        line = command.stdout.readline()
        assert line.startswith('table '), line
        table = Path('/dev/shm') / line.split()[1].lstrip('/')
        time.sleep(2)  # at work
        os.killpg(command.pid, signal.SIGKILL)
        command.wait()
        time.sleep(1)
        assert not table.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(command.pid, signal.SIGKILL)
        command.wait()


def test_the_writer_processes_die_with_the_command(tmp_path):
    """The converter's own process killed (SIGKILL: the out-of-memory killer, a scheduler):
    its writer processes end too, within seconds. They went on with their work (here 2 minutes of
    it), then waited for ever for the chunks the dead command had not yet sent, holding their
    memory and the deleted temporary's disk space."""
    import psutil
    small_split(tmp_path / 'data', 6000)
    command = subprocess.Popen([PYTHON, '-c', WRITE_WITH_A_WORKER_THAT_ENDS, 'slow',
                                f'--data-dir={tmp_path / "data"}', '--split=train',
                                f'--out={tmp_path}', '--num-workers=2'], env=run_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers, deadline = [], time.monotonic() + 60
    try:
        while len(workers) < 2:  # its children but multiprocessing's resource tracker
            assert time.monotonic() < deadline and command.poll() is None
            time.sleep(0.1)
            workers = [p for p in psutil.Process(command.pid).children()
                       if 'resource_tracker' not in ' '.join(p.cmdline())]
        time.sleep(1)  # at work
        command.kill()
        command.wait()
        _, alive = psutil.wait_procs(workers, timeout=10)
        left = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], left
    finally:
        command.kill()
        for p in workers:
            with contextlib.suppress(psutil.Error):
                p.kill()


@pytest.mark.slow
def test_a_split_of_100000_tiny_files_is_listed_and_written(tmp_path, monkeypatch):
    """10 classes of 10,000 tiny JPEGs (hard links): listed from the folder entries alone (no
    file is opened; its speed is bench_writer's concern); every fifth of them (20,000, in every
    class: writing all took 30 s of the suite) written with every label in place."""
    import builtins
    import io

    from ffcv.reader import Reader
    from PIL import Image
    buf = io.BytesIO()
    Image.new('RGB', (4, 3), (200, 10, 10)).save(buf, 'JPEG')
    for c in range(10):
        folder = tmp_path / 'data' / 'train' / f'n{c:02d}'
        folder.mkdir(parents=True)
        (folder / '00000.JPEG').write_bytes(buf.getvalue())
        for i in range(1, 10_000):
            os.link(folder / '00000.JPEG', folder / f'{i:05d}.JPEG')
    opened, real_open = [], builtins.open
    monkeypatch.setattr(builtins, 'open', lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    classes, samples, _ = sources.load_split(tmp_path / 'data', 'train')
    monkeypatch.undo()
    assert len(samples) == 100_000 and opened == []
    out = tmp_path / 'train.beton'
    stats = writer.write_beton(samples[::5], out, max_res=256, num_workers=2)
    assert stats['images'] == 20_000 and stats['skipped'] == 0
    labels = Reader(str(out)).metadata['f1']
    assert (labels == np.repeat(np.arange(10), 2_000)).all()


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_midway_leaves_the_old_file_and_no_temporary(tmp_path, sig):
    """SIGTERM (``timeout``, ``scancel``, a job's time limit) or Ctrl-C, to the converter and its
    processes midway: one line saying it stopped, exit 143 or death by SIGINT, the previous .beton
    as it was, and no temporary left (SIGTERM left the whole partial file, tens of GB on ImageNet,
    and Ctrl-C printed tracebacks); a killed run's temporary of the file is removed too."""
    small_split(tmp_path / 'data', 2000)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'train_256.beton').write_bytes(b'the previous file')
    stale = out / '.train_256.beton.partial-999999999'  # a killed run's: no such PID runs
    stale.write_bytes(b'left by a killed run')
    command = converter_in_its_group(tmp_path / 'data', out, stderr=subprocess.PIPE)
    try:
        assert command.stdout.readline().startswith('table ')  # writing has started
        time.sleep(1)
        assert [p for p in out.glob('.train_256.beton.partial-*') if p != stale]
        assert not stale.exists()
        os.killpg(command.pid, sig)  # to every process of the group, as the terminal and SLURM
        _, err = command.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(command.pid, signal.SIGKILL)
        command.wait()
    # Ctrl-C: the command ends by SIGINT (not exit 130), so that a shell's loop stops too
    assert command.returncode == (143 if sig == signal.SIGTERM else -signal.SIGINT), err
    name = 'SIGTERM' if sig == signal.SIGTERM else 'Ctrl-C'
    assert err.strip().splitlines()[-1].endswith(f': stopped by {name}: nothing written, '
                                                 f'{out / "train_256.beton"} is as it was'), err
    assert 'Traceback' not in err, err
    assert sorted(p.name for p in out.iterdir()) == ['train_256.beton']
    assert (out / 'train_256.beton').read_bytes() == b'the previous file'


def test_a_second_conversion_to_a_file_being_written_is_refused_before_any_work(
        tmp_path, monkeypatch, capsys):
    """A conversion started while another process of this machine writes the same .beton (its
    temporary is there, its PID runs) stops at once, before listing the images, naming that
    process and its temporary, with --overwrite too: the later of the two replaced the other's
    file unseen, after doubling the work. A conversion makes its temporary before its first slow
    step. A temporary last written over a minute before its PID's process started is a killed
    run's (the PID taken by a later process): not a writer, so the file is written; it is left
    in place (its PID runs: no clock tells a reused PID in every container)."""
    small_split(tmp_path / 'data', 4)
    samples = sources.list_samples(tmp_path / 'data' / 'train', ['n00', 'n01'])
    out = tmp_path / 'train.beton'
    other = subprocess.Popen(['sleep', '60'])
    try:
        tmp = tmp_path / f'.train.beton.partial-{other.pid}'
        tmp.write_bytes(b'being written')
        refusal = (f'{out}: another conversion to this file is running (process {other.pid}, '
                   f'writing {tmp}): wait for it to end or choose another --out (if no '
                   f'conversion runs, delete {tmp})')
        with pytest.raises(errors.InputError) as e:
            writer.write_beton(samples, out, max_res=256, num_workers=1)
        assert str(e.value) == refusal
        monkeypatch.setattr(write, 'load_split', None)  # refused before listing: never called
        assert write.cli(['--data-dir', str(tmp_path / 'data'), '--split', 'train',
                          '--out', str(out), '--overwrite']) == 1
        assert capsys.readouterr().err.strip().endswith(refusal)
        assert not out.exists() and tmp.read_bytes() == b'being written'
        past = time.time() - 3600
        os.utime(tmp, (past, past))  # older than the process that now has its PID
        seen = []

        def seen_from_another_process(out, needed):
            seen.append(subprocess.run(
                [PYTHON, '-c', 'import sys; from imagenet_ffcv import files; '
                 'print(files.live_temporaries(*sys.argv[1:]))', str(tmp_path), 'train.beton'],
                cwd=REPO, capture_output=True, text=True).stdout.strip())
        monkeypatch.setattr(writer, 'check_free_space', seen_from_another_process)
        assert writer.write_beton(samples, out, max_res=256, num_workers=1)['images'] == 4
        mine = tmp_path / f'.train.beton.partial-{files.host_name()}-{os.getpid()}'
        assert seen == [f'[({mine!r}, {os.getpid()}, None)]']  # claimed before the space check
        assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name, 'data', 'train.beton']
    finally:
        other.kill()
        other.wait()


def test_another_machines_temporary_is_a_writers_until_unwritten_for_ten_minutes(tmp_path,
                                                                                 monkeypatch):
    """A folder shared by nodes: another machine's PID means nothing here. Its temporary (its
    host name in the name) was deleted as a dead process's, under the conversion writing it; now
    it is taken for a writer's, and the conversion refused naming the host, until it has not been
    written for ``files.OTHER_MACHINE_STALE_S`` (then deleted as a killed run's). This machine's
    temporaries still go by their process."""
    out, dead = tmp_path / 'train.beton', dead_pid()
    there = tmp_path / f'.train.beton.partial-gpu-node-07.cluster-{dead}'
    here = tmp_path / f'.train.beton.partial-{files.host_name()}-{dead}'
    for tmp in (there, here):
        tmp.write_bytes(b'written')
    assert files.remove_stale_temporaries(tmp_path) == [here]
    assert files.live_temporaries(tmp_path, 'train.beton') == [(there, dead, 'gpu-node-07.cluster')]
    with pytest.raises(errors.InputError) as e:
        beton_out.check_not_being_written(out)
    assert re.fullmatch(
        f'{re.escape(str(out))}: another conversion to this file is running \\(process {dead} on '
        f'gpu-node-07.cluster, which wrote {re.escape(str(there))} [0-9] s ago\\): wait for it to '
        f'end or choose another --out \\(if no conversion runs, delete {re.escape(str(there))}\\)',
        str(e.value)), str(e.value)
    # ages by the folder's clock (the file server's): a node whose clock runs ahead took every
    # other node's temporary for a killed run's, and deleted it
    monkeypatch.setattr(time, 'time', lambda: os.stat(there).st_mtime + 3600)
    assert files.live_temporaries(tmp_path, 'train.beton') == [(there, dead, 'gpu-node-07.cluster')]
    assert files.remove_stale_temporaries(tmp_path) == []
    monkeypatch.undo()
    past = time.time() - files.OTHER_MACHINE_STALE_S - 5
    os.utime(there, (past, past))
    assert files.live_temporaries(tmp_path, 'train.beton') == []
    beton_out.check_not_being_written(out)
    assert files.remove_stale_temporaries(tmp_path) == [there]
    assert list(tmp_path.iterdir()) == []


def test_folders_labelled_by_a_class_list_are_named_by_wnid_or_ilsvrc_index(tmp_path):
    """--classes: a folder is named by a wnid of the list or by ILSVRC-2012's index of one
    (ImageNet-V2's 0 .. 999: folder 5 is ILSVRC's class 5 whatever the list, which was taken
    as the list's own class 5, labelling a run of other classes' images wrongly), listed in the
    list's order; a folder that is neither (written 07, 1000, ², a class the list lacks) or a
    second folder of one class is refused, naming them. The list may be given as a run folder
    or a .beton; a missing one is named."""
    ilsvrc = [wnid for wnid, _ in classes_module.ilsvrc_classes()]
    listed = [(ilsvrc[5], 'a'), (ilsvrc[0], 'b'), (ilsvrc[217], 'c')]  # a run's own order
    assert classes_module.folders_by_class_list(['217', '0', ilsvrc[5]], listed, tmp_path) == [
        (ilsvrc[5], ilsvrc[5]), ('0', ilsvrc[0]), ('217', ilsvrc[217])]
    with pytest.raises(errors.InputError) as e:
        classes_module.folders_by_class_list(['07', '1', '1000', '5', 'x', '²'], listed, tmp_path)
    assert str(e.value) == (f'{tmp_path}: 07, 1, 1000, x, ²: not a class of the list given '
                            f'(--classes): neither one of its wnids nor an ILSVRC-2012 class '
                            f'index (0 .. 999) of one; move such folders out, or give the class '
                            f'list they belong to')
    with pytest.raises(errors.InputError, match=rf': 0 and {ilsvrc[0]} are both class 1 '
                                                rf'\({ilsvrc[0]}\) of the'):
        classes_module.folders_by_class_list(['0', ilsvrc[0]], listed, tmp_path)
    assert len(classes_module.class_list_of('ilsvrc2012')) == 1000
    write_class_list(tmp_path / 'classes.tsv', [w for w, _ in listed])
    write_class_list(tmp_path / 'val.classes.tsv', [w for w, _ in listed])
    for given in (tmp_path, tmp_path / 'val.beton'):  # a run folder, a .beton
        assert [w for w, _ in classes_module.class_list_of(str(given))] == [w for w, _ in listed]
    with pytest.raises(errors.MissingFileError, match='--classes nowhere.tsv: no such file'):
        classes_module.class_list_of('nowhere.tsv')
    with pytest.raises(errors.MissingFileError) as e:
        classes_module.class_list_of(str(tmp_path / 'train.beton'))
    assert str(e.value) == (f'--classes {tmp_path / "train.beton"}: no class list there '
                            f'({tmp_path / "train.classes.tsv"})')


def test_out_ending_in_a_slash_is_a_folder_and_a_full_disk_names_the_file(tmp_path, monkeypatch,
                                                                          capsys):
    """``--out newdir/`` (not there yet) is a folder for the default name: it wrote a file named
    newdir, which the other split then overwrote. A write that fails without naming a file (a
    full disk, a file size limit) names the .beton and says nothing was written (it printed
    only '[Errno 27] File too large')."""
    import errno
    small_split(tmp_path / 'data', 8)
    val = tmp_path / 'data' / 'val'
    for wnid in ('n00', 'n01'):
        (val / wnid).mkdir(parents=True)
        os.link(tmp_path / 'data' / 'values' / '0.png', val / wnid / 'a.png')
    for split in ('train', 'val'):
        assert write.cli([f'--data-dir={tmp_path / "data"}', f'--split={split}', '--max-res=32',
                          f'--out={tmp_path / "newdir"}/', '--num-workers=1']) == 0
    assert sorted(p.name for p in (tmp_path / 'newdir').glob('*.beton')) == ['train_32.beton',
                                                                            'val_32.beton']
    capsys.readouterr()

    def too_large(*args, **kwargs):
        raise OSError(errno.EFBIG, 'File too large')
    monkeypatch.setattr(writer._Writer, 'finalize', too_large)
    out = tmp_path / 'newdir' / 'train_32.beton'
    before = out.read_bytes()
    assert write.cli([f'--data-dir={tmp_path / "data"}', '--split=train', '--max-res=32',
                      f'--out={out}', '--overwrite', '--num-workers=1']) == 1
    err = capsys.readouterr().err
    assert f'writing {out}: File too large; nothing was written ({out} is as it was)' in err, err
    assert out.read_bytes() == before and not list(out.parent.glob('.*partial*'))
    # off the main thread (a caller's worker thread) no signal handler can be installed: it runs
    results = []
    thread = threading.Thread(target=lambda: results.append(write.cli(['--verify', str(out)])))
    thread.start()
    thread.join()
    assert results == [0]  # the file kept as it was reads back whole

def test_a_data_set_without_val_holds_out_a_share_of_each_train_class(tmp_path, capsys):
    """A data set of class folders with train/ only (common outside ImageNet) had no way to a val
    split. --holdout F makes one of a share F of each train class, the same for both commands,
    so the two splits never share an image; --split val without it names --holdout (and a
    valid/ folder, if there is one)."""
    data = tmp_path / 'data'
    small_split(data, 41)  # n00: 21 images, n01: 20
    (data / 'train' / 'n02').mkdir()
    os.link(data / 'values' / '0.png', data / 'train' / 'n02' / 'only.png')
    args = ['--data-dir', str(data), '--max-res', '32', '--num-workers', '1']
    assert write.cli(args + ['--split', 'val', '--out', str(tmp_path / 'v.beton')]) == 1
    assert ('val split folder not found; hold out part of train/ as the val split: --holdout 0.1 '
            'with --split val') in capsys.readouterr().err
    (data / 'valid').mkdir()
    assert write.cli(args + ['--split', 'val', '--out', str(tmp_path / 'v.beton')]) == 1
    assert f'rename {data / "valid"} to val, or hold out' in capsys.readouterr().err
    for split in ('train', 'val'):
        assert write.cli(args + ['--split', split, '--holdout', '0.1',
                                 '--out', str(tmp_path / f'{split}.beton')]) == 0
    val_labels = verify.records(tmp_path / 'val.beton')['label'].tolist()
    train_labels = verify.records(tmp_path / 'train.beton')['label'].tolist()
    assert val_labels == [0, 0, 1, 1]  # round(0.1 x 21), round(0.1 x 20); none of a lone image
    assert train_labels == [0] * 19 + [1] * 18 + [2]
    classes = sources.find_classes(data / 'train')
    samples = sources.list_samples(data / 'train', classes)
    val, train = (holdout.held_out(samples, 0.1, split) for split in ('val', 'train'))
    assert not set(val) & set(train) and sorted(val + train) == sorted(samples)
    assert train == [s for s in samples if s not in val]  # the order of samples kept
    assert holdout.held_out(samples[::-1], 0.1, 'val') == val[::-1]  # by name, not position
    # the same names held out from the raw tars as from folders (a tar reference holds the
    # member's offset and size, which are not hashed); a class keeps one image in train
    names = [f'n01_{i}.JPEG' for i in range(20)]
    files = [(f'/d/train/n01/{name}', 0) for name in names]
    tar = [(ilsvrc.tar_ref('/d/ILSVRC2012_img_train.tar', f'n01.tar/{name}', 512 * (i + 1), 99),
            0) for i, name in enumerate(names)]
    held = [[ilsvrc.sample_file_name(path) for path, _ in holdout.held_out(s, 0.2, 'val')]
            for s in (files, tar)]
    assert held[0] == held[1] and len(held[0]) == 4
    assert set(held[0]) not in (set(names[:4]), set(sorted(names)[:4]))  # by hash, not order
    again = [ilsvrc.sample_file_name(p) for p, _ in holdout.held_out(
        [('/d/train/n01/n01_00.JPEG', 0)] + files, 0.2, 'val')]  # one image more, sorting first
    assert len(again) == 4 and len(set(again) - set(held[0])) <= 1  # the others stay held out
    pairs = [('a/x.png', 0), ('a/y.png', 0), ('b/z.png', 1)]
    assert [label for _, label in holdout.held_out(pairs, 0.9, 'train')] == [0, 1]
    assert len(holdout.held_out(files[:5], 0.5, 'val')) == 3  # 2.5 rounded half up, not to even
    with pytest.raises(SystemExit):
        write.cli(args + ['--split', 'val', '--holdout', '1'])


def test_a_val_split_held_out_of_a_train_beton_that_holds_it_is_refused(tmp_path, recwarn):
    """--holdout given to the val command only: the train .beton held every val image, and the
    trainer measured top-1 on training images without a word. The converter records each
    .beton's --split and --holdout beside it; the trainer's class check (betons.num_classes)
    refuses a pair that differ, naming the files and the command to mend it, and a val .beton
    written with --split train (a command copied unchanged), whatever the training .beton's
    record. The same file as both splits gives a warning. Betons without a record (older ones)
    pass unchecked."""
    data = tmp_path / 'data'
    small_split(data, 20)
    args = ['--data-dir', str(data), '--max-res', '32', '--num-workers', '1']
    written = {'train': ('train', '0'), 'train_held': ('train', '0.2'), 'val': ('val', '0.2'),
               'train_more': ('train', '0.3'), 'val_copied': ('train', '0.2')}
    files = {name: tmp_path / f'{name}.beton' for name in written}
    for name, (split, share) in written.items():
        assert write.cli(args + ['--split', split, '--holdout', share,
                                 '--out', str(files[name])]) == 0
    assert json.loads((tmp_path / 'val.holdout.json').read_text()) == {'split': 'val',
                                                                       'holdout': 0.2}
    with pytest.raises(holdout.HoldoutMismatchError) as info:
        betons.num_classes(files['train'], val_path=files['val'])
    assert str(info.value) == (
        f"{files['val']} holds out 0.2 of each class of train/ (--holdout 0.2), but "
        f"{files['train']} was written with none, so the two share images and top-1 would be "
        f"measured on training images: write {files['train']} again with --split train "
        f"--holdout 0.2 --overwrite")
    assert betons.num_classes(files['train_held'], val_path=files['val']) == 2
    with pytest.raises(holdout.HoldoutMismatchError, match=r"train_more.beton was written with "
                       r"--holdout 0.3, so some images of train/ are in neither split"):
        betons.num_classes(files['train_more'], val_path=files['val'])
    copied = (r"val_copied.beton was written with --split train: it holds training images; the "
              r"validation .beton is written with --split val")
    with pytest.raises(holdout.HoldoutMismatchError, match=copied):
        betons.num_classes(files['train_held'], val_path=files['val_copied'])
    assert not recwarn.list
    (tmp_path / 'train.holdout.json').unlink()  # as an older version wrote it
    with pytest.raises(holdout.HoldoutMismatchError, match=copied):  # passed: train unrecorded
        betons.num_classes(files['train'], val_path=files['val_copied'])
    assert betons.num_classes(files['train'], val_path=files['val']) == 2
    assert betons.num_classes(files['train'], val_path=files['train']) == 2
    assert [str(w.message) for w in recwarn.list] == [
        f"{files['train']} is the training .beton too: top-1 is measured on the training images"]
    # the trainer's other ranks check as rank 0 does, and leave the warning to it
    assert betons.num_classes(files['train'], val_path=files['train'], warn=False) == 2
    assert len(recwarn.list) == 1
    with pytest.raises(holdout.HoldoutMismatchError):
        betons.num_classes(files['train_more'], val_path=files['val'], warn=False)


def test_kaggles_val_labels_saved_by_excel_read_as_they_are(tmp_path):
    """LOC_val_solution.csv saved by Excel starts with a byte order mark: it was refused with
    "expected the header ImageId,PredictionString", the header the user saw in it."""
    labels = tmp_path / 'LOC_val_solution.csv'
    labels.write_text('ImageId,PredictionString\r\nILSVRC2012_val_00000001,n01751748 1 2 3 4\r\n',
                      encoding='utf-8-sig')
    assert ilsvrc.val_solution(labels) == {'ILSVRC2012_val_00000001': 'n01751748'}
    # saved as UTF-16 ("Unicode text"): a UnicodeDecodeError traceback from the command
    labels.write_text('ImageId,PredictionString\n', encoding='utf-16')
    with pytest.raises(errors.InputError, match=f'{labels}: not UTF-8 text'):
        ilsvrc.val_solution(labels)


def test_a_class_list_that_is_not_text_is_an_error_naming_it(tmp_path):
    """A binary or UTF-16 file given as a class list (predict --classes) raised
    UnicodeDecodeError, which the commands printed as a traceback."""
    from imagenet_ffcv.classes import ClassListError, read_class_list
    path = tmp_path / 'classes.tsv'
    path.write_text('0\tn01440764\ttench\n', encoding='utf-16')
    with pytest.raises(ClassListError, match=f'{path}: not UTF-8 text .* give the .classes.tsv'):
        read_class_list(path)


def test_pils_warnings_about_an_image_name_its_file(tmp_path):
    """A JPEG with a corrupt EXIF block is stored (its pixels are whole), and PIL's warning
    "Corrupt EXIF data. Expecting to read 12 bytes but only got 10." named no file: among a
    million images, the user could not tell which. It is warned again naming the file."""
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 120, np.uint8)).save(buf, 'JPEG')
    exif = b'Exif\0\0II*\0\x08\0\0\0\x05\0' + b'\x12\x01\x03\0\x01\0\0\0\x06\0'  # 5 entries? 1
    path = tmp_path / 'odd_exif.jpg'
    path.write_bytes(buf.getvalue()[:2] + b'\xff\xe1' + (len(exif) + 2).to_bytes(2, 'big') + exif
                     + buf.getvalue()[2:])
    with pytest.warns(UserWarning, match=f'^{path}: Corrupt EXIF data'):
        assert images.load_image(path, max_res=32).shape == (32, 48, 3)


def test_jfif_images_are_images_and_other_val_files_are_named_not_counted_missing(three_layouts,
                                                                                 recwarn):
    """A JPEG saved as .jfif (browsers' "Save image as") was left out of class folders as 'not an
    image', and Kaggle's flat val folder dropped it without a word, then counted its label's
    image 'not there'. It is an image now; a val file with another extension is named as left
    out, and not counted as missing."""
    roots, wnids = three_layouts
    cls_loc = roots['kaggle'] / 'ILSVRC' / 'Data' / 'CLS-LOC'
    val = sorted((cls_loc / 'val').iterdir())
    val[0].rename(val[0].with_suffix('.jfif'))
    val[1].rename(val[1].with_suffix('.txt'))
    _, samples, _ = sources.load_split(roots['kaggle'], 'val')
    assert len(samples) == 5 and str(val[0].with_suffix('.jfif')) in {p for p, _ in samples}
    assert [str(w.message) for w in recwarn.list] == [
        f'1 file whose extension is not one of {", ".join(constants.IMAGE_EXTENSIONS)} left out: '
        f'{val[1].stem}.txt; convert them to one of those to keep them']
    recwarn.clear()
    train = roots['folders'] / 'train' / wnids[0]
    first = sorted(train.iterdir())[0]
    first.rename(first.with_suffix('.jfif'))
    _, samples, _ = sources.load_split(roots['folders'], 'train')
    assert len(samples) == 9 and not recwarn.list
    assert (str(first.with_suffix('.jfif')), 0) in samples


def test_a_folder_that_cannot_be_listed_stops_the_listing_naming_it(tmp_path, monkeypatch,
                                                                    capsys):
    """A subfolder without read permission stopped the converter with a bare 'Permission
    denied'; it now says what the folder costs and what to do, before any work. (The tests run
    as root, who reads any folder: the refusal is simulated.)"""
    root = tmp_path / 'data'
    for name in ('a/x.JPEG', 'a/sub/y.JPEG', 'b/z.JPEG'):
        (root / 'train' / name).parent.mkdir(parents=True, exist_ok=True)
        Image.open(sample_images(1)[0]).save(root / 'train' / name)
    scandir = os.scandir

    def refuse(path='.'):
        if str(path).endswith('sub'):
            raise PermissionError(13, 'Permission denied', str(path))
        return scandir(path)
    monkeypatch.setattr(os, 'scandir', refuse)
    out = tmp_path / 'train.beton'
    assert write.cli(['--data-dir', str(root), '--split', 'train', '--out', str(out)]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f'{root / "train" / "a" / "sub"}: this folder cannot be listed (Permission denied), so '
        f'its images would be left out; make it readable (chmod -R a+rX) or move it out, then '
        f'run again')
    assert not out.exists()


def test_a_class_tar_member_that_is_no_image_is_named_as_left_out(tmp_path):
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w') as inner:
        for name, payload in (('a.JPEG', sample_images(1)[0].read_bytes()), ('notes.txt', b'x')):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            inner.addfile(info, io.BytesIO(payload))
    with tarfile.open(tmp_path / ilsvrc.TRAIN_TAR, 'w') as outer:
        info = tarfile.TarInfo('n01440764.tar')
        info.size = len(buf.getvalue())
        outer.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.warns(UserWarning, match=r'^1 file whose extension .* left out: '
                                         r'n01440764\.tar/notes\.txt;'):
        samples = ilsvrc.tar_train_samples(tmp_path, ['n01440764'])
    assert [(p.split('::')[1].split('@')[0], label) for p, label in samples] == [
        ('n01440764.tar/a.JPEG', 0)]


def test_messages_name_the_first_few_of_a_list_then_dots():
    assert errors.first_few(['a.JPEG', 'b.JPEG']) == 'a.JPEG, b.JPEG'
    assert errors.first_few(map(str, range(7))) == '0, 1, 2, 3, 4 ...'  # any iterable
    assert errors.first_few([Path('x'), 'y', 'z'], 2, sep='; ') == 'x; y ...'
    assert errors.first_few(range(3), 3) == '0, 1, 2'
