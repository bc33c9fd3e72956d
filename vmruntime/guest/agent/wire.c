/* Frames and fields (docs/agent-protocol.md, "Frames"), and the byte queue they live in. */
#define _GNU_SOURCE
#include "agent.h"

#include <stdlib.h>
#include <string.h>

static void put_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

size_t buf_pending(const struct buf *b)
{
    return b->len - b->off;
}

void buf_reserve(struct buf *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return;
    /* Slide the unconsumed bytes to the front before growing. */
    if (b->off) {
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + extra <= b->cap)
            return;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra)
        cap *= 2;
    b->data = xrealloc(b->data, cap);
    b->cap = cap;
}

void buf_append(struct buf *b, const void *p, size_t n)
{
    buf_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

void buf_consume(struct buf *b, size_t n)
{
    b->off += n;
    if (b->off == b->len)
        b->off = b->len = 0;
}

void buf_free(struct buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}

size_t frame_begin(struct buf *q, uint8_t type, uint32_t channel)
{
    uint8_t h[HEADER_SIZE] = {0};
    h[4] = type;
    put_le(h + 8, channel, 4);
    buf_append(q, h, sizeof h);
    /* Relative to the unconsumed start: buf_reserve may slide the bytes meanwhile. */
    return q->len - q->off - HEADER_SIZE;
}

void frame_end(struct buf *q, size_t start)
{
    put_le(q->data + q->off + start, q->len - q->off - start - HEADER_SIZE, 4);
}

void field_bytes(struct buf *q, uint16_t tag, const void *p, size_t n)
{
    uint8_t h[6];
    put_le(h, tag, 2);
    put_le(h + 2, n, 4);
    buf_append(q, h, sizeof h);
    buf_append(q, p, n);
}

void field_u64(struct buf *q, uint16_t tag, uint64_t v)
{
    uint8_t b[8];
    put_le(b, v, 8);
    field_bytes(q, tag, b, sizeof b);
}

void field_str(struct buf *q, uint16_t tag, const char *s)
{
    field_bytes(q, tag, s, strlen(s));
}

int field_next(struct field_iter *it, struct field *f)
{
    if (it->left == 0)
        return 0;
    if (it->left < 6)
        return -1;
    f->tag = (uint16_t)get_le(it->p, 2);
    f->len = (uint32_t)get_le(it->p + 2, 4);
    if (f->len > it->left - 6)
        return -1;
    f->val = it->p + 6;
    it->p += 6 + f->len;
    it->left -= 6 + (size_t)f->len;
    return 1;
}

bool field_as_u64(const struct field *f, uint64_t *out)
{
    if (f->len != 8)
        return false;
    *out = get_le(f->val, 8);
    return true;
}

char *field_as_str(const struct field *f)
{
    if (memchr(f->val, 0, f->len))
        return NULL;
    return xstrndup((const char *)f->val, f->len);
}
