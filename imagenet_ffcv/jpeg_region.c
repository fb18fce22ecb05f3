/* Decode one rectangle of a JPEG with libjpeg-turbo, optionally DCT-scaled by 1/2, 1/4 or 1/8;
 * and resample a decoded rectangle bilinearly into the batch (resample_bilinear, at the end).
 *
 * Two ways to decode, chosen per JPEG:
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
 * The marker way ends in the second on the small JPEG, at the same first column, with one change:
 * the small JPEG's Huffman data is decoded by this file's own decoder (decode_huffman_mcu, put in
 * libjpeg's slot for it), because libjpeg-turbo decodes the Huffman data of any JPEG with restart
 * markers on its slow path. Both ways give the same pixels (tests/test_decoders.py). Pixels two
 * or more rows/columns inside the decoded rectangle equal those of a full decode; the caller asks
 * for a margin of 2 around what it samples.
 *
 * Built at install time (setup.py: a setuptools Extension linked against libjpeg, found with
 * pkg-config), loaded with ctypes (imagenet_ffcv/jpeg_region.py) and called from numba
 * (imagenet_ffcv/decoders.py). One decompressor, one buffer for the small JPEG, one set of Huffman
 * lookup tables and one resample buffer per thread, kept for the thread's lifetime.
 */
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <pthread.h>
#include <jpeglib.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* The SHA-256 of this file when it was built (setup.py defines it), so that a library older than
 * its source is noticed (jpeg_region.py compares). */
#ifndef JPEG_REGION_SOURCE_SHA256
#define JPEG_REGION_SOURCE_SHA256 "unknown"
#endif
const char *jpeg_region_source_sha256(void) { return JPEG_REGION_SOURCE_SHA256; }

/* ---- Huffman decoding of baseline JPEG data: the entropy step of the marker way ----------------
 *
 * libjpeg-turbo decodes the Huffman data of any JPEG with restart markers on its slow path (its
 * fast path, decode_mcu_fast in jdhuff.c, is for JPEGs without them). The marker way decodes
 * the small JPEG's data with the decoder below instead, in libjpeg's own slot for it (the
 * entropy module's decode_mcu, one MCU of DCT coefficients per call; IDCT, upsampling and colour
 * conversion stay libjpeg-turbo's). It follows JPEG (ITU-T T.81) F.2.2 as libjpeg does, so the
 * coefficients are the same; data it finds corrupt (a code no table has, a restart marker out of
 * place, data that ends early or goes on past an interval's end) makes the region decode fall back
 * to libjpeg, which judges the JPEG. Its speed comes from two lookup tables per Huffman table,
 * indexed by the next LOOKUP_BITS bits (as stb_image and libjpeg-turbo's fast path): the symbol
 * and code length of the short codes, and for the AC table the run and the signed value of the
 * short codes whose value bits fit too. */
#define LOOKUP_BITS 10
#define INLINE static inline __attribute__((always_inline))

struct huffman_table {
    uint8_t bits[17], values[256];  /* the JHUFF_TBL it was built from (counts per length) */
    int built;
    uint16_t lookup[1 << LOOKUP_BITS];  /* code length << 8 | symbol; 0: a longer code */
    int32_t ac_lookup[1 << LOOKUP_BITS];  /* value << 16 | run << 8 | bits used; 0: not short */
    uint32_t max_code[17];  /* per length l: (largest code of length l + 1) << (32 - l) */
    int32_t offset[17];     /* per length: index in values of the code 0 of that length */
};

/* The reader of the entropy-coded data: bits most significant first in `acc`, `count` of them,
 * `padding` of which are zeros standing for data past a marker or the end. */
struct bit_reader {
    const uint8_t *p, *end;
    uint64_t acc;
    int count, padding;
};

/* Build `t` from libjpeg's JHUFF_TBL `h` (JPEG's BITS and HUFFVAL lists, T.81 Annex C). Returns
 * 0; -1 for a table whose codes do not fit their lengths. */
static int build_table(struct huffman_table *t, const JHUFF_TBL *h, int ac) {
    memcpy(t->bits, h->bits, 17);
    memcpy(t->values, h->huffval, 256);
    t->built = 0;
    memset(t->lookup, 0, sizeof t->lookup);
    memset(t->ac_lookup, 0, sizeof t->ac_lookup);
    uint32_t code = 0;
    int k = 0;
    for (int l = 1; l <= 16; l++) {
        t->offset[l] = k - (int)code;
        for (int i = 0; i < h->bits[l]; i++, k++, code++) {
            if (k >= 256 || code >= (1u << l)) return -1;
            if (l <= LOOKUP_BITS) {  /* every LOOKUP_BITS-bit string starting with this code */
                uint32_t first = code << (LOOKUP_BITS - l), n = 1u << (LOOKUP_BITS - l);
                for (uint32_t j = first; j < first + n; j++) {
                    uint8_t symbol = h->huffval[k];
                    t->lookup[j] = (uint16_t)(l << 8 | symbol);
                    int run = symbol >> 4, size = symbol & 15;
                    if (ac && size && l + size <= LOOKUP_BITS) {
                        int raw = (int)(j >> (LOOKUP_BITS - l - size)) & ((1 << size) - 1);
                        int value = raw < (1 << (size - 1)) ? raw - (1 << size) + 1 : raw;
                        t->ac_lookup[j] = (int32_t)((uint32_t)value << 16 | run << 8 | (l + size));
                    }
                }
            }
        }
        t->max_code[l] = code == (1u << l) ? 0xFFFFFFFFu : code << (32 - l);
        code <<= 1;
    }
    t->built = 1;
    return 0;
}

/* Top up `r->acc` to at least 57 bits: eight bytes at once when none of them is 0xFF, else byte
 * by byte, un-stuffing 0xFF00 and stopping at a marker (zeros after it, counted in padding). */
INLINE void refill(struct bit_reader *r) {
    if (r->end - r->p >= 8) {
        uint64_t w;
        memcpy(&w, r->p, 8);
        uint64_t x = ~w;  /* a byte of w is 0xFF where a byte of x is 0 */
        if (!((x - 0x0101010101010101ull) & ~x & 0x8080808080808080ull)) {
            int take = (64 - r->count) >> 3;
            r->acc |= __builtin_bswap64(w) >> r->count;
            r->p += take;
            r->count += take * 8;
            return;
        }
    }
    while (r->count <= 56) {
        uint32_t byte = 0;
        if (r->p < r->end && r->p[0] != 0xFF) {
            byte = *r->p++;
        } else if (r->p + 1 < r->end && r->p[0] == 0xFF && r->p[1] == 0x00) {
            byte = 0xFF;
            r->p += 2;
        } else {
            r->padding += 8;  /* a marker (left unread) or the end of the data */
        }
        r->acc |= (uint64_t)byte << (56 - r->count);
        r->count += 8;
    }
}

/* The next Huffman symbol of table `t`; -1 for a code that is not in it. */
INLINE int decode_symbol(struct bit_reader *r, const struct huffman_table *t) {
    uint32_t entry = t->lookup[r->acc >> (64 - LOOKUP_BITS)];
    if (entry) {
        r->acc <<= entry >> 8;
        r->count -= entry >> 8;
        return entry & 255;
    }
    uint32_t top = (uint32_t)(r->acc >> 32);
    int l = LOOKUP_BITS + 1;
    while (l <= 16 && top >= t->max_code[l]) l++;
    if (l > 16) return -1;
    int symbol = t->offset[l] + (int)(top >> (32 - l));
    r->acc <<= l;
    r->count -= l;
    return t->values[symbol & 255];
}

/* The next `size` bits (1-15) as a signed value (T.81 F.2.2.1, EXTEND). */
INLINE int signed_bits(struct bit_reader *r, int size) {
    int raw = (int)(r->acc >> (64 - size));
    r->acc <<= size;
    r->count -= size;
    return raw < (1 << (size - 1)) ? raw - (1 << size) + 1 : raw;
}

/* Zigzag order to natural order, with 16 entries past the end for corrupt runs (as libjpeg). */
static const uint8_t natural_order[80] = {
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27,
    20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58,
    59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
    63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63};

/* Decode one 8 x 8 block into `block` (zeroed by the caller), DC predicted from `*dc`. Returns 0;
 * -1 for a code not in its table. */
INLINE int decode_block(struct bit_reader *r, JCOEF *block, const struct huffman_table *dc_table,
                               const struct huffman_table *ac_table, int *dc) {
    if (r->count < 32) refill(r);
    int s = decode_symbol(r, dc_table);
    if (s < 0) return -1;
    if (s) *dc += signed_bits(r, s);
    block[0] = (JCOEF)*dc;
    for (int k = 1; k < 64; k++) {
        if (r->count < 32) refill(r);
        int32_t fast = ac_table->ac_lookup[r->acc >> (64 - LOOKUP_BITS)];
        if (fast) {
            int used = fast & 255;
            r->acc <<= used;
            r->count -= used;
            k += (fast >> 8) & 15;
            block[natural_order[k]] = (JCOEF)(fast >> 16);
            continue;
        }
        int rs = decode_symbol(r, ac_table);
        if (rs < 0) return -1;
        int run = rs >> 4, size = rs & 15;
        if (size) {
            k += run;
            block[natural_order[k]] = (JCOEF)signed_bits(r, size);
        } else if (run == 15) {
            k += 15;
        } else {
            break;  /* end of block */
        }
    }
    return 0;
}

/* ---- The decoder of each thread -------------------------------------------------------------- */
struct error_manager { struct jpeg_error_mgr pub; jmp_buf jump; };
struct decoder {
    struct jpeg_decompress_struct cinfo;  /* first: decode_huffman_mcu finds the rest from it */
    struct error_manager err;
    uint8_t *small;           /* the small JPEG of the marker way; grown, never shrunk */
    uint64_t small_capacity;  /* bytes */
    struct huffman_table tables[8];  /* DC 0-3, AC 0-3, as the last JPEG's */
    struct bit_reader reader;
    int dc[4];                /* the DC predictions, per component of the scan */
    uint32_t mcus_left;       /* in the restart interval */
    uint64_t mcus_left_in_scan;
    uint32_t restarts;        /* markers passed */
    int huffman_failed;       /* decode_huffman_mcu found the data corrupt */
    float *row;               /* resample_bilinear's buffer; grown, never shrunk */
    uint64_t row_capacity;    /* floats */
};

/* libjpeg's entropy module as jpegint.h declares it (unchanged from IJG libjpeg 6b to
 * libjpeg-turbo 3): the marker way puts decode_huffman_mcu in its decode_mcu slot. */
struct entropy_module {
    void (*start_pass)(j_decompress_ptr cinfo);
    boolean (*decode_mcu)(j_decompress_ptr cinfo, JBLOCKROW *MCU_data);
    boolean insufficient_data;
};

/* Fail the decode from inside libjpeg: back to decode_scanlines' setjmp, noting that the data
 * (not libjpeg) was found corrupt, so that the caller decodes the JPEG with libjpeg instead. */
static void huffman_failed(struct decoder *d) {
    d->huffman_failed = 1;
    longjmp(d->err.jump, 1);
}

/* The end of a restart interval (or of the scan): the data read up to its last bits (fewer than
 * 8 left, the padding), then its marker, the next RSTn (read, and the DC predictions reset) or,
 * after the scan's last MCU, any marker (the small JPEG's EOI). Anything else is corrupt data:
 * libjpeg warns of data left before a marker, a marker out of place or data that ends early. */
static void end_interval(struct decoder *d, struct bit_reader *r) {
    if (r->count < r->padding || r->count - r->padding >= 8 || r->end - r->p < 2 ||
        r->p[0] != 0xFF)
        huffman_failed(d);
    if (d->mcus_left_in_scan == 0) {
        if (r->p[1] == 0x00 || r->p[1] == 0xFF) huffman_failed(d);
        return;
    }
    if (r->p[1] != 0xD0 + (d->restarts & 7)) huffman_failed(d);
    r->p += 2;
    r->acc = 0;
    r->count = r->padding = 0;
    memset(d->dc, 0, sizeof d->dc);
    d->restarts++;
    d->mcus_left = d->cinfo.restart_interval;
}

/* libjpeg's decode_mcu: the next MCU's blocks (zeroed by libjpeg; NULL: decoded and dropped). */
static boolean decode_huffman_mcu(j_decompress_ptr c, JBLOCKROW *blocks) {
    struct decoder *d = (struct decoder *)c;  /* cinfo is its first member */
    struct bit_reader reader = d->reader, *r = &reader;  /* a local copy, kept in registers */
    JBLOCK scratch;
    for (int b = 0; b < c->blocks_in_MCU; b++) {
        int component = c->MCU_membership[b];
        jpeg_component_info *info = c->cur_comp_info[component];
        JCOEF *block = blocks ? blocks[b][0] : scratch;
        if (decode_block(r, block, &d->tables[info->dc_tbl_no], &d->tables[4 + info->ac_tbl_no],
                         &d->dc[component]))
            huffman_failed(d);
    }
    if (r->count < r->padding) huffman_failed(d);  /* it read past a marker or the end */
    d->mcus_left_in_scan--;
    if (--d->mcus_left == 0 || d->mcus_left_in_scan == 0) end_interval(d, r);
    d->reader = reader;
    return TRUE;
}

/* Put decode_huffman_mcu in libjpeg's slot for the JPEG just started in `d->cinfo` (a baseline
 * scan of every component with restart markers, its data `size` bytes at `data`), its tables
 * built unless the same as the last JPEG's. Returns 0; -1 (nothing changed) if a table cannot
 * be built. */
static int use_huffman_decoder(struct decoder *d, const uint8_t *data, uint64_t size) {
    struct jpeg_decompress_struct *c = &d->cinfo;
    for (int k = 0; k < 8; k++) {
        JHUFF_TBL *h = k < 4 ? c->dc_huff_tbl_ptrs[k] : c->ac_huff_tbl_ptrs[k - 4];
        struct huffman_table *t = &d->tables[k];
        if (h == NULL) {
            t->built = 0;
            continue;
        }
        if (!(t->built && !memcmp(t->bits, h->bits, 17) && !memcmp(t->values, h->huffval, 256)) &&
            build_table(t, h, k >= 4))
            return -1;
    }
    for (int b = 0; b < c->blocks_in_MCU; b++) {
        jpeg_component_info *info = c->cur_comp_info[c->MCU_membership[b]];
        if (!d->tables[info->dc_tbl_no].built || !d->tables[4 + info->ac_tbl_no].built) return -1;
    }
    d->reader = (struct bit_reader){data, data + size, 0, 0, 0};
    memset(d->dc, 0, sizeof d->dc);
    d->restarts = 0;
    d->mcus_left = c->restart_interval ? c->restart_interval : UINT32_MAX;
    d->mcus_left_in_scan = (uint64_t)c->MCUs_per_row * c->MCU_rows_in_scan;
    ((struct entropy_module *)c->entropy)->decode_mcu = decode_huffman_mcu;
    return 0;
}


static void on_error(j_common_ptr cinfo) { longjmp(((struct error_manager *)cinfo->err)->jump, 1); }
/* Warnings (level -1: corrupt data, which libjpeg replaces with grey) are counted, not printed. */
static void on_message(j_common_ptr cinfo, int level) { if (level < 0) cinfo->err->num_warnings++; }

static pthread_key_t key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;

static void destroy_decoder(void *p) {
    struct decoder *d = p;
    jpeg_destroy_decompress(&d->cinfo);
    free(d->small);
    free(d->row);
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
 * This is libjpeg-turbo's partial decompression, whether or not the JPEG has restart markers.
 * `data`: 0, or the offset of the entropy-coded data of a JPEG that read_layout accepted, to be
 * decoded by decode_huffman_mcu (-1 and d->huffman_failed set if it finds the data corrupt). */
static int decode_scanlines(struct decoder *d, const uint8_t *src, uint64_t size, uint8_t *dst,
                            uint64_t capacity, uint32_t top, uint32_t left, uint32_t height,
                            uint32_t width, uint32_t denom, int64_t *info, uint64_t data) {
    struct jpeg_decompress_struct *c = &d->cinfo;
    d->huffman_failed = 0;
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
    if (data)
        use_huffman_decoder(d, src + data, size - data);
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
 * small JPEG (small_jpeg), decoded by libjpeg-turbo's partial decompression with its Huffman data
 * decoded by decode_huffman_mcu. Returns 1 (and nothing decoded) when the markers are not where
 * the layout says or the Huffman data is corrupt: the caller then decodes the JPEG the other
 * way, where libjpeg judges the damage. */
static int decode_intervals(struct decoder *d, const uint8_t *src, uint64_t size,
                            const struct layout *l, uint8_t *dst, uint64_t capacity, uint32_t top,
                            uint32_t left, uint32_t height, uint32_t width, uint32_t denom,
                            int64_t *info) {
    uint32_t row0, col0;
    int64_t length = small_jpeg(d, src, size, l, top, left, height, width, denom, &row0, &col0);
    if (length <= 0) return length == 0 ? 1 : (int)length;
    int code = decode_scanlines(d, d->small, (uint64_t)length, dst, capacity, top - row0,
                                left - col0, height, width, denom, info, l->data);
    if (code == -1 && d->huffman_failed) return 1;  /* libjpeg judges the JPEG */
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
    return decode_scanlines(d, src, size, dst, capacity, top, left, height, width, denom, info,
                            0);
}

/* decode_region without the marker way: libjpeg-turbo's partial decompression of any JPEG, for
 * comparisons (jpeg_region.decode_region(restart_markers=False)). */
int decode_region_scanlines(const uint8_t *src, uint64_t size, uint8_t *dst, uint64_t capacity,
                            uint32_t top, uint32_t left, uint32_t height, uint32_t width,
                            uint32_t denom, int64_t *info) {
    struct decoder *d = thread_decoder();
    if (d == NULL) return -4;
    return decode_scanlines(d, src, size, dst, capacity, top, left, height, width, denom, info,
                            0);
}

/* ---- The resample's common case ---------------------------------------------------------------
 *
 * Four floats at once, in the compiler's generic vectors (SSE on x86-64, NEON on ARM): an RGB
 * pixel and one float more, loaded and stored unaligned. */
typedef float f32x4 __attribute__((vector_size(16)));
static inline f32x4 load4(const float *p) { f32x4 v; memcpy(&v, p, sizeof v); return v; }

/* dst[0 .. n) <- line[0 .. n): on x86-64 with streaming stores from the first 16-byte boundary,
 * which write the batch without reading it into the cache first (the batch is not read again
 * before it leaves the cache). */
static void stream_floats(float *dst, const float *line, uint64_t n) {
#ifdef __SSE2__
    uint64_t e = 0;
    for (; e < n && ((uintptr_t)(dst + e) & 15); e++) dst[e] = line[e];
    for (; e + 4 <= n; e += 4) _mm_stream_ps(dst + e, _mm_loadu_ps(line + e));
    for (; e < n; e++) dst[e] = line[e];
#else
    memcpy(dst, line, n * sizeof *dst);
#endif
}

/* Bilinear resampling with 2 taps per axis (imagenet_ffcv/resampling.py computes the taps and
 * says when there are 2: a shrink below 2 without antialias, the loaders' common case) of the
 * uint8 RGB image `src` (rows of `stride` bytes) into `dst`: `out_h` rows of `out_w` RGB pixels,
 * float32 (v - mean[c]) * inv_std[c] when `normalize`, else uint8 rounded. Output row oy blends
 * source rows row_index[2 oy], row_index[2 oy + 1] with row_weight[2 oy], row_weight[2 oy + 1];
 * output pixel ox the pixels that start at elements col_index[2 ox], col_index[2 ox + 1] of that
 * blend (element offsets in a source row, 3 per pixel, all in [first, first + count)) with
 * col_weight[2 ox], col_weight[2 ox + 1]; a flip is in the order of the column taps. Per output
 * row: the two source rows blended over the columns used (vectorised by the compiler), then the
 * pixels taken 4 floats at a time into a row buffer, each store writing one float into the next
 * pixel (written next), the row's last pixel one float at a time; then the row to `dst`
 * (stream_floats; uint8: rounded). Returns 0; -4 if out of memory. */
int resample_bilinear(const uint8_t *src, uint64_t stride, const int64_t *row_index,
                      const float *row_weight, const int64_t *col_index, const float *col_weight,
                      uint64_t first, uint64_t count, void *dst, uint64_t out_h, uint64_t out_w,
                      const float *mean, const float *inv_std, int normalize) {
    struct decoder *d = thread_decoder();
    if (d == NULL) return -4;
    /* In the thread's buffer: each output column's two weights as vectors, times the channels'
     * gain; the blended source row; the uint8 path's output row before its conversion. */
    uint64_t floats = 8 * out_w + count + 4 + 3 * out_w + 1;
    if (d->row_capacity < floats) {
        float *grown = realloc(d->row, floats * sizeof *grown);
        if (grown == NULL) return -4;
        d->row = grown;
        d->row_capacity = floats;
    }
    float *weights = d->row, *row = d->row + 8 * out_w - first, *line = row + first + count + 4;
    memset(row + first + count, 0, 4 * sizeof *row);  /* read, never used: the 4th float of the last pixel */
    f32x4 gain = {1, 1, 1, 0}, offset = {0, 0, 0, 0};
    if (normalize)
        for (int c = 0; c < 3; c++) {
            gain[c] = inv_std[c];
            offset[c] = mean[c] * inv_std[c];
        }
    for (uint64_t t = 0; t < 2 * out_w; t++) {
        f32x4 w = col_weight[t] * gain;
        memcpy(weights + 4 * t, &w, sizeof w);
    }
    for (uint64_t oy = 0; oy < out_h; oy++) {
        const uint8_t *s0 = src + row_index[2 * oy] * stride;
        const uint8_t *s1 = src + row_index[2 * oy + 1] * stride;
        float w0 = row_weight[2 * oy], w1 = row_weight[2 * oy + 1];
        for (uint64_t e = first; e < first + count; e++)
            row[e] = w0 * s0[e] + w1 * s1[e];
        float *out = line;
        uint64_t ox = 0;
        for (; ox + 1 < out_w; ox++) {
            f32x4 v = load4(weights + 8 * ox) * load4(row + col_index[2 * ox]) +
                      load4(weights + 8 * ox + 4) * load4(row + col_index[2 * ox + 1]) - offset;
            memcpy(out + 3 * ox, &v, sizeof v);
        }
        for (int c = 0; c < 3; c++)  /* the last pixel: no next pixel to write into */
            out[3 * ox + c] = weights[8 * ox + c] * row[col_index[2 * ox] + c] +
                              weights[8 * ox + 4 + c] * row[col_index[2 * ox + 1] + c] - offset[c];
        if (normalize) {
            stream_floats((float *)dst + oy * out_w * 3, line, 3 * out_w);
        } else {  /* a convex blend of 0-255 values: + 0.5 truncates to its rounding */
            uint8_t *pixels = (uint8_t *)dst + oy * out_w * 3;
            for (uint64_t e = 0; e < 3 * out_w; e++)
                pixels[e] = (uint8_t)(int32_t)(line[e] + 0.5f);
        }
    }
#ifdef __SSE2__
    _mm_sfence();  /* the streamed stores done before the batch is handed on */
#endif
    return 0;
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

/* For profiling: the entropy step of decode_region for the whole JPEG `src` alone: its headers
 * read and the decompression started (as decode_region does), then every MCU's Huffman data
 * decoded (no IDCT, no upsampling, no colour conversion), by decode_huffman_mcu for a JPEG with
 * restart markers (read_layout), by libjpeg's own decoder for any other. Returns 0; -1 for a
 * corrupt JPEG, -5 if it held corrupt data. */
int entropy_decode(const uint8_t *src, uint64_t size) {
    struct decoder *d = thread_decoder();
    if (d == NULL) return -4;
    struct jpeg_decompress_struct *c = &d->cinfo;
    struct layout l;
    int markers = read_layout(src, size, &l);
    if (setjmp(d->err.jump)) {
        jpeg_abort_decompress(c);
        return -1;
    }
    c->err->num_warnings = 0;
    jpeg_mem_src(c, src, (unsigned long)size);
    jpeg_read_header(c, TRUE);
    c->out_color_space = JCS_RGB;
    c->dct_method = JDCT_IFAST;
    jpeg_start_decompress(c);
    if (markers)
        use_huffman_decoder(d, src + l.data, size - l.data);
    struct entropy_module *entropy = (struct entropy_module *)c->entropy;
    for (uint64_t m = (uint64_t)c->MCUs_per_row * c->MCU_rows_in_scan; m > 0; m--)
        entropy->decode_mcu(c, NULL);
    jpeg_abort_decompress(c);
    return c->err->num_warnings ? -5 : 0;
}

/* ---- The converter's reading of a source JPEG -------------------------------------------------
 *
 * PIL, which decodes the converter's other inputs, drops libjpeg's warnings: a JPEG whose
 * entropy-coded data is damaged (a bad Huffman code, a segment that ends early) but ends in its
 * EOI marker decodes without a word, the blocks libjpeg could not read filled with grey; and one
 * that is whole but for its final EOI marker is refused as truncated. read_source_jpeg decodes
 * a JPEG as PIL does (libjpeg's ISLOW IDCT and fancy upsampling, DCT-scaled as PIL's draft) and
 * listens to libjpeg's warnings as it goes; check_source_jpeg only listens (for JPEGs PIL
 * decodes, CMYK ones), decoding at 1/8 scale into one row: every scan's entropy-coded data read
 * as at full size, the IDCT the DC term alone.
 * What libjpeg notices is what is heard: most damage of a byte in a baseline JPEG's data goes
 * unseen, about half in a progressive one's (the Huffman decoder reads on, out of step, and may
 * find bytes left over before the next marker: 'extraneous bytes', a warning whole files give
 * too, so not taken for damage), and arithmetic-coded data that runs out is filled in without a
 * warning (such a JPEG that ends early is taken as truncated, whatever it lacks; one with an EOI
 * marker cannot be judged). */
#include <jerror.h>

struct check_errors {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int damaged;              /* libjpeg filled in data it could not read */
    int ended;                /* the data ended before an EOI marker (JWRN_JPEG_EOF) */
    char message[JMSG_LENGTH_MAX];  /* the first damage warning's text, or the error's */
};

static void check_error(j_common_ptr c) {
    struct check_errors *e = (struct check_errors *)c->err;
    c->err->format_message(c, e->message);
    longjmp(e->jump, 1);
}

static void check_warning(j_common_ptr c, int level) {
    struct check_errors *e = (struct check_errors *)c->err;
    int code = c->err->msg_code;
    if (level >= 0) return;  /* trace messages */
    if (code == JWRN_JPEG_EOF) {
        e->ended = 1;
    } else if (code == JWRN_HIT_MARKER || code == JWRN_HUFF_BAD_CODE ||
               code == JWRN_ARITH_BAD_CODE || code == JWRN_MUST_RESYNC) {
        if (!e->damaged) c->err->format_message(c, e->message);
        e->damaged = 1;
    }  /* others (extraneous bytes before a marker, an unknown JFIF revision...): not damage */
}

/* The components of the scans read, noted by libjpeg's progress monitor, which it calls before
 * each row of input it reads (and each scanline it returns). */
struct scans_seen {
    struct jpeg_progress_mgr pub;
    unsigned components;      /* bit k: component k was in a scan */
};

static void note_scan(j_common_ptr common) {
    struct jpeg_decompress_struct *c = (struct jpeg_decompress_struct *)common;
    struct scans_seen *seen = (struct scans_seen *)common->progress;
    for (int i = 0; i < c->comps_in_scan; i++)
        seen->components |= 1u << c->cur_comp_info[i]->component_index;
}

/* Whether every coefficient of the JPEG was read: for a progressive JPEG, each one refined to its
 * last bit (coef_bits 0, libjpeg's record of the scans read; a legal progressive JPEG may stop
 * short of that, so this is asked only of one whose data ended early); for a sequential one,
 * every component was in a scan (scans_seen). */
static int all_coefficients_read(struct jpeg_decompress_struct *c) {
    if (!c->progressive_mode)
        return ((struct scans_seen *)c->progress)->components == (1u << c->num_components) - 1;
    for (int ci = 0; ci < c->num_components; ci++)
        for (int k = 0; k < DCTSIZE2; k++)
            if (c->coef_bits[ci][k] != 0) return 0;
    return 1;
}

/* Decode the JPEG `src` (`size` bytes), any kind libjpeg reads (baseline, progressive, CMYK,
 * arithmetic-coded...), scaled by 1/`denom` (1, 2, 4 or 8). With `dst`: as RGB (ISLOW IDCT,
 * fancy upsampling: PIL's settings; a grayscale JPEG's channel thrice; CMYK cannot be) into
 * `dst`, `capacity` bytes, info[0] <- its height, info[1] <- its width; without (NULL): in the
 * JPEG's own colour space into one row, the fastest way (check_source_jpeg).
 * Returns 0: intact, as far as libjpeg can tell (warnings other than damage aside); 1: intact but
 * for its missing EOI marker (every coefficient read, Huffman-coded, the data ending there); 2:
 * damaged, libjpeg filled part of it with grey (`message` holds its first warning); 3: the data
 * ends before the image does (a truncated file; or a sequential JPEG with a component in no
 * scan, cut between scans); -1: libjpeg refuses it (`message` holds its error); -2: `capacity`
 * is too small. `message`: JMSG_LENGTH_MAX (200) bytes. Thread-safe: a decompressor of its own per
 * call. */
int read_source_jpeg(const uint8_t *src, uint64_t size, uint32_t denom, uint8_t *dst,
                     uint64_t capacity, int64_t *info, char *message) {
    struct jpeg_decompress_struct c;
    struct check_errors e;
    JSAMPARRAY row = NULL;
    memset(&e, 0, sizeof e);
    c.err = jpeg_std_error(&e.pub);
    e.pub.error_exit = check_error;
    e.pub.emit_message = check_warning;
    jpeg_create_decompress(&c);
    struct scans_seen seen;
    memset(&seen, 0, sizeof seen);
    seen.pub.progress_monitor = note_scan;
    c.progress = &seen.pub;
    if (setjmp(e.jump)) {
        jpeg_destroy_decompress(&c);
        memcpy(message, e.message, JMSG_LENGTH_MAX);
        return -1;
    }
    jpeg_mem_src(&c, src, (unsigned long)size);
    jpeg_read_header(&c, TRUE);
    c.scale_num = 1;
    c.scale_denom = denom;
    if (dst) {
        c.out_color_space = JCS_RGB;
    } else {
        c.out_color_space = c.jpeg_color_space;  /* no colour conversion */
        c.dct_method = JDCT_IFAST;
        c.do_fancy_upsampling = FALSE;
    }
    jpeg_start_decompress(&c);
    uint64_t stride = (uint64_t)c.output_width * c.output_components;
    if (dst) {
        info[0] = c.output_height;
        info[1] = c.output_width;
        if (stride * c.output_height > capacity) {
            jpeg_destroy_decompress(&c);
            return -2;
        }
        JSAMPARRAY rows = (*c.mem->alloc_small)((j_common_ptr)&c, JPOOL_IMAGE,
                                                c.output_height * sizeof(JSAMPROW));
        for (JDIMENSION y = 0; y < c.output_height; y++) rows[y] = dst + stride * y;
        while (c.output_scanline < c.output_height)
            jpeg_read_scanlines(&c, rows + c.output_scanline,
                                c.output_height - c.output_scanline);
    } else {
        row = (*c.mem->alloc_sarray)((j_common_ptr)&c, JPOOL_IMAGE, (JDIMENSION)stride, 1);
        while (c.output_scanline < c.output_height) jpeg_read_scanlines(&c, row, 1);
    }
    note_scan((j_common_ptr)&c);
    int all = all_coefficients_read(&c);  /* before coef_bits is freed with the image */
    /* a sequential JPEG codes every component in a scan: one that lacks one was cut */
    int every = c.progressive_mode || all;
    int whole = all && !c.arith_code;
    jpeg_finish_decompress(&c);
    jpeg_destroy_decompress(&c);
    memcpy(message, e.message, JMSG_LENGTH_MAX);
    if (e.ended || !every) return e.damaged || !whole ? 3 : 1;
    return e.damaged ? 2 : 0;
}

/* read_source_jpeg's verdict on the JPEG `src` without its pixels. */
int check_source_jpeg(const uint8_t *src, uint64_t size, char *message) {
    return read_source_jpeg(src, size, 8, NULL, 0, NULL, message);
}
