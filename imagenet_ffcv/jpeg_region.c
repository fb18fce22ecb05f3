/* Decode one rectangle of a JPEG with libjpeg-turbo, optionally DCT-scaled by 1/2, 1/4 or 1/8.
 *
 * Two ways, chosen per JPEG:
 * - Restart markers (a DRI segment; the converter writes them, imagenet_ffcv/images.py
 *   encode_jpeg): the entropy-coded data is cut into intervals of a fixed number of MCUs, each
 *   decodable on its own (the DC predictions restart at each marker). The decoder finds the
 *   markers (a scan of the bytes for 0xFF), copies the intervals that cover the rectangle into a
 *   small JPEG of its own (the same headers with the rectangle's height and width, the markers
 *   renumbered 0-7 in order) and decodes that. When an interval is a divisor of the MCUs in a
 *   row, only the intervals of the rectangle's columns are read; otherwise whole MCU rows, from
 *   the nearest row where an interval starts.
 * - Otherwise, libjpeg-turbo's partial decompression (jpeg_skip_scanlines, jpeg_crop_scanline, as
 *   in its djpeg -crop and TensorFlow's decode_and_crop_jpeg): rows above the rectangle are
 *   entropy-decoded but not transformed, rows below it are not read at all, and columns outside
 *   it (to the iMCU boundary) are not transformed.
 * The marker way ends in the second on the small JPEG, at the same first column: both give the
 * same pixels (tests/test_decoders.py). Pixels two or more rows/columns inside the decoded
 * rectangle equal those of a full decode; the caller asks for a margin of 2 around what it
 * samples.
 *
 * Built at install time (setup.py: a setuptools Extension linked against libjpeg, found with
 * pkg-config) and called from numba through ctypes (imagenet_ffcv/decoders.py). One decompressor
 * and one buffer for the small JPEG per thread, kept for the thread's lifetime.
 */
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <pthread.h>
#include <jpeglib.h>

/* The SHA-256 of this file when it was built (setup.py defines it), so that a library older than
 * its source is noticed (decoders.py compares). */
#ifndef JPEG_REGION_SOURCE_SHA256
#define JPEG_REGION_SOURCE_SHA256 "unknown"
#endif
const char *jpeg_region_source_sha256(void) { return JPEG_REGION_SOURCE_SHA256; }

struct error_manager { struct jpeg_error_mgr pub; jmp_buf jump; };
struct decoder {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    uint8_t *small;           /* the small JPEG of the marker way; grown, never shrunk */
    uint64_t small_capacity;  /* bytes */
};

static void on_error(j_common_ptr cinfo) { longjmp(((struct error_manager *)cinfo->err)->jump, 1); }
/* Warnings (level -1: corrupt data, which libjpeg replaces with grey) are counted, not printed. */
static void on_message(j_common_ptr cinfo, int level) { if (level < 0) cinfo->err->num_warnings++; }

static pthread_key_t key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;

static void destroy_decoder(void *p) {
    struct decoder *d = p;
    jpeg_destroy_decompress(&d->cinfo);
    free(d->small);
    free(d);
}

static void make_key(void) { pthread_key_create(&key, destroy_decoder); }

static struct decoder *thread_decoder(void) {
    pthread_once(&key_once, make_key);
    struct decoder *d = pthread_getspecific(key);
    if (d == NULL) {
        d = calloc(1, sizeof *d);
        if (d == NULL) return NULL;
        d->cinfo.err = jpeg_std_error(&d->err.pub);
        d->err.pub.error_exit = on_error;
        d->err.pub.emit_message = on_message;
        jpeg_create_decompress(&d->cinfo);
        pthread_setspecific(key, d);
    }
    return d;
}

/* Decode rows [top, top + height) and at least columns [left, left + width) of the JPEG `src`
 * (`size` bytes) scaled by 1/`denom` (1, 2, 4 or 8), coordinates in the scaled image, as RGB
 * (fast integer IDCT, as ffcv) into `dst`: `height` rows of info[1] pixels, 3 bytes each.
 * info[0] <- the first decoded column (<= left), info[1] <- the decoded width.
 * Returns 0; -1 for a corrupt JPEG, -2 if the rectangle needs more than `capacity` bytes or lies
 * outside the scaled image, -3 if the data ended early, -4 if out of memory, -5 if the decoded
 * part held corrupt data (libjpeg warned and filled it in).
 * This is libjpeg-turbo's partial decompression, whether or not the JPEG has restart markers. */
static int decode_scanlines(struct decoder *d, const uint8_t *src, uint64_t size, uint8_t *dst,
                            uint64_t capacity, uint32_t top, uint32_t left, uint32_t height,
                            uint32_t width, uint32_t denom, int64_t *info) {
    struct jpeg_decompress_struct *c = &d->cinfo;
    if (setjmp(d->err.jump)) {
        jpeg_abort_decompress(c);
        return -1;
    }
    c->err->num_warnings = 0;
    jpeg_mem_src(c, src, (unsigned long)size);
    jpeg_read_header(c, TRUE);
    c->out_color_space = JCS_RGB;
    c->dct_method = JDCT_IFAST;
    c->scale_num = 1;
    c->scale_denom = denom;
    jpeg_start_decompress(c);
    if (top + height > c->output_height || left + width > c->output_width || height == 0) {
        jpeg_abort_decompress(c);
        return -2;
    }
    JDIMENSION xoffset = left, xwidth = width;
    if (left > 0 || width < c->output_width)
        jpeg_crop_scanline(c, &xoffset, &xwidth);
    uint64_t stride = (uint64_t)c->output_width * 3;
    if (stride * height > capacity) {
        jpeg_abort_decompress(c);
        return -2;
    }
    if (top > 0)
        jpeg_skip_scanlines(c, top);
    JSAMPROW rows[16];
    for (uint32_t r = 0; r < height;) {
        uint32_t n = height - r < 16 ? height - r : 16;
        for (uint32_t k = 0; k < n; k++) rows[k] = dst + (uint64_t)(r + k) * stride;
        JDIMENSION got = jpeg_read_scanlines(c, rows, n);
        if (got == 0) {
            jpeg_abort_decompress(c);
            return -3;
        }
        r += got;
    }
    info[0] = xoffset;
    info[1] = c->output_width;
    jpeg_abort_decompress(c);
    return c->err->num_warnings ? -5 : 0;
}

/* What the marker way needs to know of a JPEG, read from the segments before its scan. */
struct layout {
    uint64_t sof;           /* offset of the SOF marker: height at +5, width at +7 (big-endian) */
    uint64_t data;          /* offset of the entropy-coded data (just after the SOS segment) */
    uint32_t height, width; /* px */
    uint32_t mcu_height, mcu_width;     /* px */
    uint32_t mcu_rows, mcus_per_row;
    uint32_t interval;      /* MCUs per restart interval (the DRI segment) */
    uint32_t column_align;  /* px: where libjpeg's jpeg_crop_scanline can start a row (8 x Hmax) */
};

/* Fill `l` from the headers of the JPEG `src` (`size` bytes). Returns 1 for a baseline or
 * extended sequential Huffman JPEG (SOF0, SOF1) of 8-bit samples with restart markers whose one
 * scan holds every component; 0 for any other JPEG (which libjpeg then judges whole). */
static int read_layout(const uint8_t *src, uint64_t size, struct layout *l) {
    if (size < 4 || src[0] != 0xFF || src[1] != 0xD8) return 0;
    uint32_t components = 0, hmax = 0, vmax = 0;
    l->sof = l->data = 0;
    l->height = l->width = l->interval = 0;
    uint64_t p = 2;
    for (;;) {
        if (p + 4 > size || src[p] != 0xFF) return 0;
        uint8_t marker = src[p + 1];
        if (marker == 0xFF || marker == 0x01) {  /* a fill byte; TEM, which has no length */
            p += marker == 0xFF ? 1 : 2;
            continue;
        }
        uint32_t length = (uint32_t)src[p + 2] << 8 | src[p + 3];  /* counts itself, not the marker */
        if (length < 2 || p + 2 + length > size) return 0;
        const uint8_t *s = src + p + 4;  /* length - 2 bytes */
        if (marker == 0xC0 || marker == 0xC1) {
            if (length < 8) return 0;
            components = s[5];
            if (s[0] != 8 || components < 1 || components > 4 || length != 8 + 3 * components)
                return 0;
            l->sof = p;
            l->height = (uint32_t)s[1] << 8 | s[2];
            l->width = (uint32_t)s[3] << 8 | s[4];
            for (uint32_t k = 0; k < components; k++) {
                uint32_t h = s[7 + 3 * k] >> 4, v = s[7 + 3 * k] & 15;
                if (h < 1 || h > 4 || v < 1 || v > 4) return 0;
                hmax = h > hmax ? h : hmax;
                vmax = v > vmax ? v : vmax;
            }
        } else if ((marker >= 0xC2 && marker <= 0xCF && marker != 0xC4) ||
                   (marker >= 0xD0 && marker <= 0xD9)) {
            return 0;  /* progressive, lossless or arithmetic-coded; a stray standalone marker */
        } else if (marker == 0xDD) {
            if (length != 4) return 0;
            l->interval = (uint32_t)s[0] << 8 | s[1];
        } else if (marker == 0xDA) {  /* no SOF before it, or not every component in it */
            if (components == 0 || length != 6 + 2 * components || s[0] != components) return 0;
            l->data = p + 2 + length;
            break;
        }
        p += 2 + length;
    }
    if (l->interval == 0 || l->height == 0 || l->width == 0) return 0;
    /* One component: a non-interleaved scan, whose MCU is one 8 x 8 block. */
    l->mcu_width = components == 1 ? 8 : 8 * hmax;
    l->mcu_height = components == 1 ? 8 : 8 * vmax;
    l->column_align = 8 * hmax;
    l->mcus_per_row = (l->width + l->mcu_width - 1) / l->mcu_width;
    l->mcu_rows = (l->height + l->mcu_height - 1) / l->mcu_height;
    return 1;
}

/* Where the entropy-coded data of `src` goes on from `from`: the offset of the next marker other
 * than a stuffed 0xFF00 or fill bytes (the 0xFF just before its code), or `size` if none. */
static uint64_t next_marker(const uint8_t *src, uint64_t size, uint64_t from) {
    while (from + 1 < size) {
        const uint8_t *ff = memchr(src + from, 0xFF, size - 1 - from);
        if (ff == NULL) return size;
        uint64_t p = (uint64_t)(ff - src);
        if (src[p + 1] == 0xFF || src[p + 1] == 0x00)  /* fill byte (then a marker) or stuffing */
            from = p + (src[p + 1] == 0x00 ? 2 : 1);
        else
            return p;
    }
    return size;
}

/* px from MCU `first` to MCU `last` (inclusive) of the `count` MCUs of `unit` px across an image
 * `total` px wide (or high), whose last MCU may be cut. */
static uint32_t span(uint32_t first, uint32_t last, uint32_t count, uint32_t unit, uint32_t total) {
    return last + 1 == count ? total - first * unit : (last + 1 - first) * unit;
}

/* The first step of the marker way, for a JPEG whose layout `l` was read: build in d->small the
 * small JPEG of the intervals that cover the rectangle (the arguments as for decode_region).
 * Returns its length in bytes, with *row0_px and *col0_px the image row and column (scaled px) of
 * its top-left pixel; 0 (and nothing built) when the markers are not where the layout says;
 * -2 for a rectangle outside the scaled image; -4 if out of memory. */
static int64_t small_jpeg(struct decoder *d, const uint8_t *src, uint64_t size,
                          const struct layout *l, uint32_t top, uint32_t left, uint32_t height,
                          uint32_t width, uint32_t denom, uint32_t *row0_px, uint32_t *col0_px) {
    if (height == 0 || width == 0 || top + height > (l->height + denom - 1) / denom ||
        left + width > (l->width + denom - 1) / denom)
        return -2;
    /* The rectangle's MCU rows and columns (an MCU is mcu_height / denom scaled rows). */
    uint32_t mh = l->mcu_height / denom, mw = l->mcu_width / denom;
    uint32_t row0 = top / mh, row1 = (top + height - 1) / mh;
    uint32_t col0 = left / mw, col1 = (left + width - 1) / mw;
    /* The chroma upsampling of a row at the small JPEG's top or bottom edge repeats the edge
     * instead of reading the MCU row beyond: one more MCU row where the rectangle ends on one. */
    if (top % mh == 0 && row0 > 0) row0--;
    if ((top + height) % mh == 0 && row1 + 1 < l->mcu_rows) row1++;

    /* The small JPEG: MCU rows first_row..row1, columns first_col..last_col. */
    uint32_t n = l->interval, per_row = l->mcus_per_row;
    uint32_t first_row = row0, first_col = col0 / n * n, last_col = col1 / n * n + n - 1;
    /* Only the rectangle's columns when every MCU row starts an interval, the small JPEG's rows
     * start where libjpeg can start a decoded row, and it is not narrower than where libjpeg's
     * choice of chroma upsampling (smooth or repeating, from the width at the scale) changes. */
    int columns = per_row % n == 0 &&
                  (uint64_t)first_col * l->mcu_width % l->column_align == 0 &&
                  (span(first_col, last_col, per_row, l->mcu_width, l->width) + denom - 1) / denom
                      > 2 * l->column_align / 8;
    if (!columns) {  /* whole rows, from the last row at or above row0 where an interval starts */
        while ((uint64_t)first_row * per_row % n) first_row--;
        first_col = 0;
        last_col = per_row - 1;
    }
    uint64_t first = ((uint64_t)first_row * per_row + first_col) / n;  /* its intervals */
    uint64_t last = ((uint64_t)row1 * per_row + last_col) / n;
    uint64_t intervals = ((uint64_t)l->mcu_rows * per_row + n - 1) / n;  /* of the JPEG */
    uint64_t per_row_intervals = per_row / n;  /* in the column case */
    uint32_t small_height = span(first_row, row1, l->mcu_rows, l->mcu_height, l->height);
    uint32_t small_width = span(first_col, last_col, per_row, l->mcu_width, l->width);

    /* At most the whole JPEG: its headers, its intervals, a marker after each (the last: EOI). */
    if (d->small_capacity < size + 2) {
        uint8_t *grown = realloc(d->small, size + 2);
        if (grown == NULL) return -4;
        d->small = grown;
        d->small_capacity = size + 2;
    }
    uint8_t *out = d->small;
    memcpy(out, src, l->data);
    out[l->sof + 5] = (uint8_t)(small_height >> 8);
    out[l->sof + 6] = (uint8_t)small_height;
    out[l->sof + 7] = (uint8_t)(small_width >> 8);
    out[l->sof + 8] = (uint8_t)small_width;
    uint64_t length = l->data, start = l->data, copied = 0;
    for (uint64_t k = 0; k <= last; k++) {
        uint64_t end = next_marker(src, size, start);
        if (end + 1 >= size) return 0;  /* the data ends before the interval does */
        uint8_t code = src[end + 1];
        if (k + 1 < intervals ? code != 0xD0 + (k & 7) : code != 0xD9) return 0;
        int wanted = k >= first;
        if (wanted && columns) {
            uint64_t col = k % per_row_intervals * n;
            wanted = col >= first_col && col <= last_col;
        }
        if (wanted) {
            memcpy(out + length, src + start, end - start);
            length += end - start;
            out[length++] = 0xFF;
            out[length++] = 0xD0 + (copied++ & 7);
        }
        start = end + 2;
    }
    out[length - 1] = 0xD9;  /* the last interval's marker becomes EOI */
    *row0_px = first_row * mh;
    *col0_px = first_col * mw;
    return (int64_t)length;
}

/* The marker way: the same contract as decode_region, for a JPEG whose layout `l` was read: the
 * small JPEG (small_jpeg), decoded by libjpeg-turbo's partial decompression. Returns 1 (and
 * nothing decoded) when the markers are not where the layout says: the caller then decodes the
 * JPEG the other way, where libjpeg judges the damage. */
static int decode_intervals(struct decoder *d, const uint8_t *src, uint64_t size,
                            const struct layout *l, uint8_t *dst, uint64_t capacity, uint32_t top,
                            uint32_t left, uint32_t height, uint32_t width, uint32_t denom,
                            int64_t *info) {
    uint32_t row0, col0;
    int64_t length = small_jpeg(d, src, size, l, top, left, height, width, denom, &row0, &col0);
    if (length <= 0) return length == 0 ? 1 : (int)length;
    int code = decode_scanlines(d, d->small, (uint64_t)length, dst, capacity, top - row0,
                                left - col0, height, width, denom, info);
    if (code == 0) info[0] += col0;
    return code;
}

/* Decode rows [top, top + height) and at least columns [left, left + width) of the JPEG `src`
 * (`size` bytes) scaled by 1/`denom` (1, 2, 4 or 8), coordinates in the scaled image, as RGB
 * (fast integer IDCT, as ffcv) into `dst`: `height` rows of info[1] pixels, 3 bytes each.
 * info[0] <- the first decoded column (<= left), info[1] <- the decoded width.
 * Returns 0; -1 for a corrupt JPEG, -2 if the rectangle needs more than `capacity` bytes or lies
 * outside the scaled image, -3 if the data ended early, -4 if out of memory, -5 if the decoded
 * part held corrupt data (libjpeg warned and filled it in). A JPEG with restart markers is
 * decoded the marker way (see the top of this file) unless its markers are not where its headers
 * say; then, as every other JPEG, with libjpeg-turbo's partial decompression. */
int decode_region(const uint8_t *src, uint64_t size, uint8_t *dst, uint64_t capacity,
                  uint32_t top, uint32_t left, uint32_t height, uint32_t width,
                  uint32_t denom, int64_t *info) {
    struct decoder *d = thread_decoder();
    if (d == NULL) return -4;
    struct layout l;
    if ((denom == 1 || denom == 2 || denom == 4 || denom == 8) && read_layout(src, size, &l)) {
        int code = decode_intervals(d, src, size, &l, dst, capacity, top, left, height, width,
                                    denom, info);
        if (code != 1) return code;
    }
    return decode_scanlines(d, src, size, dst, capacity, top, left, height, width, denom, info);
}

/* decode_region without the marker way: libjpeg-turbo's partial decompression of any JPEG, for
 * comparisons (decoders.decode_region(restart_markers=False)). */
int decode_region_scanlines(const uint8_t *src, uint64_t size, uint8_t *dst, uint64_t capacity,
                            uint32_t top, uint32_t left, uint32_t height, uint32_t width,
                            uint32_t denom, int64_t *info) {
    struct decoder *d = thread_decoder();
    if (d == NULL) return -4;
    return decode_scanlines(d, src, size, dst, capacity, top, left, height, width, denom, info);
}

/* For profiling the marker way step by step (benchmarks/loader_profile.py): the small JPEG that
 * decode_region decodes for this rectangle (the arguments as for decode_region), copied to `dst`.
 * Returns its length in bytes, with info[0], info[1] <- the image row and column (scaled px) of
 * its top-left pixel; 0 for a JPEG that decode_region decodes the other way (no restart markers,
 * or not where its headers say); -2 if it needs more than `capacity` bytes or the rectangle lies
 * outside the scaled image; -4 if out of memory. */
int64_t region_jpeg(const uint8_t *src, uint64_t size, uint8_t *dst, uint64_t capacity,
                    uint32_t top, uint32_t left, uint32_t height, uint32_t width, uint32_t denom,
                    int64_t *info) {
    struct decoder *d = thread_decoder();
    if (d == NULL) return -4;
    struct layout l;
    if (!((denom == 1 || denom == 2 || denom == 4 || denom == 8) && read_layout(src, size, &l)))
        return 0;
    uint32_t row0, col0;
    int64_t length = small_jpeg(d, src, size, &l, top, left, height, width, denom, &row0, &col0);
    if (length <= 0) return length;
    if ((uint64_t)length > capacity) return -2;
    memcpy(dst, d->small, (uint64_t)length);
    info[0] = row0;
    info[1] = col0;
    return length;
}

/* For profiling: the entropy decoding of the whole JPEG `src` alone (libjpeg's
 * jpeg_read_coefficients: Huffman decoding into DCT coefficients, no IDCT, no upsampling, no
 * colour conversion). Returns 0; -1 for a corrupt JPEG, -5 if it held corrupt data. */
int entropy_decode(const uint8_t *src, uint64_t size) {
    struct decoder *d = thread_decoder();
    if (d == NULL) return -4;
    struct jpeg_decompress_struct *c = &d->cinfo;
    if (setjmp(d->err.jump)) {
        jpeg_abort_decompress(c);
        return -1;
    }
    c->err->num_warnings = 0;
    jpeg_mem_src(c, src, (unsigned long)size);
    jpeg_read_header(c, TRUE);
    jpeg_read_coefficients(c);
    jpeg_abort_decompress(c);
    return c->err->num_warnings ? -5 : 0;
}
