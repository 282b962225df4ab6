/* virtio-balloon driver and its page pool (see balloon.h). */
#include "balloon.h"

/* ---- end of the image ----
 * guest.ld defines no end symbol (and lld defines none when a script lays out the
 * sections). A common symbol lands in COMMON, which the script places after every .bss
 * input section of every object, so its address is the end of the image. (Clang
 * defaults to -fno-common: this is the only common symbol.) */
char sv_image_end_marker __attribute__((common));

uint64_t sv_image_end(void) { return (uint64_t)&sv_image_end_marker + 1; }

/* ---- page pool ----
 * Two bitmaps, bit i for page i of the pool: free_map (1: free) and balloon_map (1: in
 * the balloon). They live in the first pages of the region itself, so guests that never
 * use a pool carry no large .bss; those metadata pages are never handed out. */

static uint64_t *free_map, *balloon_map;
static uint64_t pool_base;
static uint32_t pool_pages, pool_free, pool_words, free_hint, balloon_hint;

int page_pool_init(uint64_t start, uint64_t end) {
    start = (start + BALLOON_PAGE_SIZE - 1) & ~(uint64_t)(BALLOON_PAGE_SIZE - 1);
    end &= ~(uint64_t)(BALLOON_PAGE_SIZE - 1);
    pool_pages = pool_free = pool_words = free_hint = balloon_hint = 0;
    if (end <= start) return -1;
    uint64_t total = (end - start) / BALLOON_PAGE_SIZE;
    if (total > BALLOON_POOL_MAX_PAGES) total = BALLOON_POOL_MAX_PAGES;
    uint64_t words = (total + 63) / 64;
    uint64_t meta = (2 * words * 8 + BALLOON_PAGE_SIZE - 1) / BALLOON_PAGE_SIZE;
    if (total <= meta) return -1;
    free_map = (uint64_t *)start;
    balloon_map = free_map + words;
    memset(free_map, 0, 2 * words * 8);
    uint64_t pages = total - meta;
    pool_base = start + meta * BALLOON_PAGE_SIZE;
    pool_words = (uint32_t)((pages + 63) / 64);
    for (uint32_t w = 0; w < pages / 64; w++) free_map[w] = ~0ull;
    if (pages % 64) free_map[pages / 64] = (1ull << (pages % 64)) - 1;
    pool_pages = pool_free = (uint32_t)pages;
    return (int)pages;
}

/* Index of a set bit in `map`, searching from word `*hint` round to it; -1 if none. */
static int64_t find_set(const uint64_t *map, uint32_t *hint) {
    for (uint32_t k = 0; k < pool_words; k++) {
        uint32_t w = (*hint + k) % pool_words;
        if (map[w]) {
            *hint = w;
            return (int64_t)w * 64 + __builtin_ctzll(map[w]);
        }
    }
    return -1;
}

static void set_bit(uint64_t *map, uint32_t i) { map[i / 64] |= 1ull << (i % 64); }
static void clear_bit(uint64_t *map, uint32_t i) { map[i / 64] &= ~(1ull << (i % 64)); }
static int test_bit(const uint64_t *map, uint32_t i) { return (map[i / 64] >> (i % 64)) & 1; }

/* Takes a free page off the free map; its index, or -1. */
static int64_t take_free(void) {
    int64_t i = find_set(free_map, &free_hint);
    if (i < 0) return -1;
    clear_bit(free_map, (uint32_t)i);
    pool_free--;
    return i;
}

void *page_alloc(void) {
    int64_t i = take_free();
    return i < 0 ? 0 : (void *)(pool_base + (uint64_t)i * BALLOON_PAGE_SIZE);
}

void page_free(void *page) {
    uint64_t a = (uint64_t)page;
    if (a < pool_base || (a - pool_base) % BALLOON_PAGE_SIZE) return;
    uint64_t i = (a - pool_base) / BALLOON_PAGE_SIZE;
    if (i >= pool_pages || test_bit(free_map, (uint32_t)i) || test_bit(balloon_map, (uint32_t)i)) return;
    set_bit(free_map, (uint32_t)i);
    pool_free++;
}

uint32_t page_pool_free_pages(void) { return pool_free; }
uint32_t page_pool_total_pages(void) { return pool_pages; }
uint64_t page_pool_start(void) { return pool_base; }

/* ---- the balloon ---- */

#define CONFIG_NUM_PAGES 0x100
#define CONFIG_ACTUAL 0x104
#define STAT_MEMFREE 4
#define STAT_MEMTOT 5
#define STAT_AVAIL 6

struct balloon_stat { uint16_t tag; uint64_t val; } __attribute__((packed));

static uint32_t pfns[BALLOON_BATCH] __attribute__((aligned(64)));
static struct balloon_stat stats_buf[3] __attribute__((aligned(64)));
static uint32_t actual;
static int have_stats, check_deflated;
static struct balloon_counters counters;

static void write_actual(struct virtio_dev *d) { sv_mmio_write32(d->base + CONFIG_ACTUAL, actual); }

uint32_t balloon_target(struct virtio_dev *d) { return sv_mmio_read32(d->base + CONFIG_NUM_PAGES); }
uint32_t balloon_actual(void) { return actual; }
int balloon_has_stats(struct virtio_dev *d) { (void)d; return have_stats; }
void balloon_counters(struct balloon_counters *c) { *c = counters; }
void balloon_set_check(int on) { check_deflated = on; }

/* Puts pfns[0..n) on queue `q` and waits until the device has taken them. */
static void send_pfns(struct virtio_dev *d, unsigned q, unsigned n) {
    struct virtio_buf b = { pfns, n * 4, 0 };
    /* The queue is idle between batches, so the buffer always fits. */
    virtq_add(d->q[q], &b, 1, pfns);
    virtio_notify(d, q);
    while (!virtq_get_used(d->q[q], 0)) virtio_wait_used(d, q);
    counters.requests++;
}

static uint32_t pfn_of(int64_t i) { return (uint32_t)((pool_base + (uint64_t)i * BALLOON_PAGE_SIZE) / BALLOON_PAGE_SIZE); }

/* Moves up to `want` pages (at most one batch) into the balloon; returns how many. */
static unsigned inflate_batch(struct virtio_dev *d, uint32_t want) {
    unsigned n = 0;
    while (n < want && n < BALLOON_BATCH) {
        int64_t i = take_free();
        if (i < 0) break;
        set_bit(balloon_map, (uint32_t)i);  /* from here on the guest keeps its hands off */
        pfns[n++] = pfn_of(i);
    }
    if (n == 0) return 0;
    send_pfns(d, 0, n);
    actual += n;
    counters.inflated += n;
    write_actual(d);
    return n;
}

/* Takes up to `want` pages (at most one batch) out of the balloon; returns how many. */
static unsigned deflate_batch(struct virtio_dev *d, uint32_t want) {
    int64_t taken[BALLOON_BATCH];
    unsigned n = 0;
    while (n < want && n < BALLOON_BATCH) {
        int64_t i = find_set(balloon_map, &balloon_hint);
        if (i < 0) break;
        clear_bit(balloon_map, (uint32_t)i);
        taken[n] = i;
        pfns[n++] = pfn_of(i);
    }
    if (n == 0) return 0;
    send_pfns(d, 1, n);  /* tell the host first, then use the pages (they read as zeros) */
    if (check_deflated) {
        counters.checked++;
        if (*(volatile uint64_t *)(pool_base + (uint64_t)taken[0] * BALLOON_PAGE_SIZE)) counters.stale++;
    }
    for (unsigned k = 0; k < n; k++) {
        set_bit(free_map, (uint32_t)taken[k]);
        pool_free++;
    }
    actual -= n;
    counters.deflated += n;
    write_actual(d);
    return n;
}

static void post_stats(struct virtio_dev *d) {
    uint64_t free_bytes = (uint64_t)pool_free * BALLOON_PAGE_SIZE;
    stats_buf[0] = (struct balloon_stat){ STAT_MEMFREE, free_bytes };
    stats_buf[1] = (struct balloon_stat){ STAT_MEMTOT, sv_boot->ram_size };
    stats_buf[2] = (struct balloon_stat){ STAT_AVAIL, free_bytes };
    struct virtio_buf b = { stats_buf, sizeof stats_buf, 0 };
    virtq_add(d->q[2], &b, 1, stats_buf);
    virtio_notify(d, 2);
    counters.stats_updates++;
}

int balloon_service_stats(struct virtio_dev *d) {
    if (!have_stats || !virtq_get_used(d->q[2], 0)) return 0;
    post_stats(d);
    return 1;
}

int balloon_open(struct virtio_dev *d, int use_interrupts) {
    actual = 0;
    have_stats = 0;
    memset(&counters, 0, sizeof counters);
    /* A pool reused across opens: pages left in an old balloon go back to it (the reset
     * device has forgotten them). */
    for (uint32_t w = 0; w < pool_words; w++) {
        pool_free += (uint32_t)__builtin_popcountll(balloon_map[w]);
        free_map[w] |= balloon_map[w];
        balloon_map[w] = 0;
    }
    int r = virtio_open(d, VIRTIO_ID_BALLOON, 0, VIRTIO_BALLOON_F_STATS_VQ, 3, use_interrupts);
    /* A device without statsq has two queues only. */
    if (r == -4) r = virtio_open(d, VIRTIO_ID_BALLOON, 0, 0, 2, use_interrupts);
    if (r) return r;
    have_stats = (d->features & VIRTIO_BALLOON_F_STATS_VQ) && d->q[2];
    write_actual(d);
    if (have_stats) post_stats(d);  /* the device holds it until it wants fresh numbers */
    return 0;
}

uint32_t balloon_poll(struct virtio_dev *d, uint32_t *target) {
    uint32_t t = balloon_target(d);
    if (target) *target = t;
    balloon_service_stats(d);
    if (t == BALLOON_QUIT) return actual;
    while (actual < t && inflate_batch(d, t - actual)) {}
    while (actual > t && deflate_batch(d, actual - t)) {}
    balloon_service_stats(d);
    return actual;
}

uint32_t balloon_wait_target(struct virtio_dev *d, uint32_t seen) {
    for (;;) {
        /* Interrupts off while checking: a change after the read leaves its interrupt
         * pending, and STI;HLT takes it. */
        if (d->use_interrupts) sv_irq_disable();
        balloon_service_stats(d);
        uint32_t t = balloon_target(d);
        if (t != seen) return t;
        if (d->use_interrupts) sv_wait_for_interrupt();
        else sv_pause();
    }
}
