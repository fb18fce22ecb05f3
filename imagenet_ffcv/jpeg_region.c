/* Decode one rectangle of a JPEG with libjpeg-turbo, optionally DCT-scaled by 1/2, 1/4 or 1/8.
 *
 * libjpeg-turbo's partial decompression (jpeg_skip_scanlines, jpeg_crop_scanline, as in its
 * djpeg -crop and TensorFlow's decode_and_crop_jpeg): rows above the rectangle are entropy-decoded
 * but not transformed, rows below it are not read at all, and columns outside it (to the iMCU
 * boundary) are not transformed. Pixels two or more rows/columns inside the decoded rectangle equal
 * those of a full decode; the caller asks for a margin of 2 around what it samples.
 *
 * Built at install time (setup.py: a setuptools Extension linked against libjpeg, found with
 * pkg-config) and called from numba through ctypes (imagenet_ffcv/decoders.py). One decompressor
 * per thread, kept for the thread's lifetime.
 */
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
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
struct decoder { struct jpeg_decompress_struct cinfo; struct error_manager err; };

static void on_error(j_common_ptr cinfo) { longjmp(((struct error_manager *)cinfo->err)->jump, 1); }
/* Warnings (level -1: corrupt data, which libjpeg replaces with grey) are counted, not printed. */
static void on_message(j_common_ptr cinfo, int level) { if (level < 0) cinfo->err->num_warnings++; }

static pthread_key_t key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;

static void destroy_decoder(void *p) {
    struct decoder *d = p;
    jpeg_destroy_decompress(&d->cinfo);
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
 * part held corrupt data (libjpeg warned and filled it in). */
int decode_region(const uint8_t *src, uint64_t size, uint8_t *dst, uint64_t capacity,
                  uint32_t top, uint32_t left, uint32_t height, uint32_t width,
                  uint32_t denom, int64_t *info) {
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
