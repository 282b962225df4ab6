// summary: Zipf page cache over a virtio-blk backing disk, its frames from the balloon's page pool: misses per balloon target (lab balloon); pages=W accesses=A smilli=1000*s
/*
 * Scenario S7's workload. A dataset of W 4 KiB pages lives on the first virtio-blk disk
 * (page i at byte i*4096, its first word i and its last word i ^ STAMP_MAGIC). The guest
 * keeps a page cache whose frames are pages of the balloon driver's page pool: at start
 * it takes every pool page (up to FMAX) as a cache frame and reads pages 0.. into them (the
 * most popular pages first, their CLOCK reference bits clear), so the host backs them. When the host asks for a bigger
 * balloon the guest first shrinks its cache — CLOCK picks the victims (empty frames go
 * first), each evicted page's frame goes back to the pool — and only then inflates, so the
 * balloon's pages are the cache's memory. Deflated pages come back as empty frames.
 *
 * Each phase: adjust to the host's target (balloon_poll), make `warm` accesses (not
 * counted) and then `accesses` accesses to page ids drawn from Zipf(s) over W pages
 * (page k has rank k+1; s = smilli/1000; a seeded splitmix64 generator; the CDF is
 * computed in fixed point — log2 by repeated squaring, 2^-x from a table of 2^(-2^-i) — and
 * sampled by binary search). Every access checks the page's stamp in its frame (a frame
 * that went into the balloon while still cached would read as zeros); a miss reads the
 * page from disk into a free or CLOCK-evicted frame. Then one line
 *   phase P balloon=B cache=C resident=R accesses=A misses=M evicted=E bad=X
 * and a write of P to port 0x81 (the lab records host memory there and sets the next
 * target), then it waits for the next target. A target of 0xFFFFFFFF ends the run.
 * Before the first phase the guest writes 0x80000000 | (cache frames + free pool pages) to
 * port 0x81: a balloon of B pages then leaves a cache of that many minus B frames.
 *
 * All of it runs at CPL3 (sv_run_user) with both virtio drivers polling: MMIO and port
 * I/O are allowed there, and on nested KVM CPL0 code is emulated very slowly.
 * Exit status: 0, 2 no disk, 3 no balloon, 4 disk too small or bad parameters, 5 a stamp
 * check failed.
 */
#include "balloon.h"

#define WMAX 16384u
#define FMAX 32768u
#define SECTORS_PER_PAGE 8u
#define STAMP_MAGIC 0x5A49504643414348ull  /* "ZIPFCACH" */
#define MARK_READY 0x80000000u

/* 2^(-2^-i) for i = 1..32, in Q0.64. */
static const uint64_t pow2_neg_frac[32] = {
    0xb504f333f9de6484ull, 0xd744fccad69d6af4ull, 0xeac0c6e7dd24392full, 0xf5257d152486cc2cull,
    0xfa83b2db722a033aull, 0xfd3e0c0cf486c175ull, 0xfe9e115c7b8f884cull, 0xff4ecb59511ec8a5ull,
    0xffa756521c8daed2ull, 0xffd3a751c0f7e10cull, 0xffe9d2b2f7db2756ull, 0xfff4e91bff1b8c3eull,
    0xfffa747ea0040664ull, 0xfffd3a3b7814eb54ull, 0xfffe9d1cc60ddab1ull, 0xffff4e8e25879bfaull,
    0xffffa7470363f451ull, 0xffffd3a37dda0313ull, 0xffffe9d1bdf703afull, 0xfffff4e8debe025eull,
    0xfffffa746f4fa150ull, 0xfffffd3a37a3f8b0ull, 0xfffffe9d1bd1065aull, 0xffffff4e8de845aeull,
    0xffffffa746f41377ull, 0xffffffd3a37a05e4ull, 0xffffffe9d1bd01fcull, 0xfffffff4e8de80c0ull,
    0xfffffffa746f4051ull, 0xfffffffd3a37a025ull, 0xfffffffe9d1bd011ull, 0xffffffff4e8de808ull,
};

static uint64_t mulhi(uint64_t a, uint64_t b) { return (uint64_t)(((unsigned __int128)a * b) >> 64); }

/* log2(k) in Q32.32, k >= 1. */
static uint64_t log2_q32(uint64_t k) {
    unsigned n = 63u - (unsigned)__builtin_clzll(k);
    uint64_t m = n >= 62 ? k >> (n - 62) : k << (62 - n);  /* Q2.62, in [1, 2) */
    uint64_t r = (uint64_t)n << 32;
    for (int i = 31; i >= 0; i--) {
        m = (uint64_t)(((unsigned __int128)m * m) >> 62);   /* in [1, 4) */
        if (m >= (1ull << 63)) { m >>= 1; r |= 1ull << i; }
    }
    return r;
}

/* 2^-e (e in Q32.32) in Q16.48, at least 1 so that every page can be drawn. */
static uint64_t pow2_neg_q48(uint64_t e) {
    uint64_t n = e >> 32;
    uint32_t f = (uint32_t)e;
    if (n >= 48) return 1;
    uint64_t v = ~0ull;  /* 1.0 - 2^-64 in Q0.64 */
    for (unsigned i = 0; i < 32; i++)
        if (f & (1u << (31 - i))) v = mulhi(v, pow2_neg_frac[i]);
    uint64_t w = (v >> 16) >> n;
    return w ? w : 1;
}

/* ---- workload state ---- */

static uint64_t cdf[WMAX];          /* cdf[k]: summed weights of pages 0..k */
static int32_t where[WMAX];         /* page -> frame, -1 when not cached */
static uint64_t frame_addr[FMAX];
static int32_t frame_page[FMAX];
static uint8_t frame_ref[FMAX];
/* Frames [0, resident) hold pages, [resident, nframes) are empty. */
static uint32_t nframes, resident, hand;
static uint32_t W;
static uint64_t rng;
static uint64_t bad, evicted_for_balloon, misses;
static struct virtio_dev blk, bd;

static uint64_t next64(void) {  /* splitmix64 */
    uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint32_t draw(void) {
    uint64_t u = mulhi(next64(), cdf[W - 1]);  /* uniform in [0, total) */
    uint32_t lo = 0, hi = W - 1;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (cdf[mid] > u) hi = mid; else lo = mid + 1;
    }
    return lo;
}

static void check_stamp(uint32_t page, uint32_t f) {
    const volatile uint64_t *w = (const volatile uint64_t *)frame_addr[f];
    if (w[0] != page || w[511] != (page ^ STAMP_MAGIC)) bad++;
}

static void load(uint32_t page, uint32_t f) {
    if (virtio_blk_read(&blk, (uint64_t)page * SECTORS_PER_PAGE, (void *)frame_addr[f], SECTORS_PER_PAGE)) bad++;
    frame_page[f] = (int32_t)page;
    frame_ref[f] = 1;
    where[page] = (int32_t)f;
}

/* CLOCK: the first frame from the hand without its reference bit (all frames full). */
static uint32_t clock_victim(void) {
    for (;;) {
        uint32_t f = hand;
        hand = hand + 1 >= nframes ? 0 : hand + 1;
        if (!frame_ref[f]) return f;
        frame_ref[f] = 0;
    }
}

static void access_page(uint32_t page) {
    int32_t f = where[page];
    if (f < 0) {
        misses++;
        uint32_t v;
        if (resident < nframes) {
            v = resident++;
        } else {
            v = clock_victim();
            where[frame_page[v]] = -1;
        }
        load(page, v);
        f = (int32_t)v;
    } else {
        frame_ref[f] = 1;
    }
    check_stamp(page, (uint32_t)f);
}

/* Gives `n` frames back to the page pool: empty ones first, then CLOCK's victims. */
static void give_frames(uint32_t n) {
    while (n-- && nframes > 1) {
        uint32_t last = nframes - 1;
        if (resident < nframes) {
            page_free((void *)frame_addr[last]);
        } else {
            uint32_t v = clock_victim();
            where[frame_page[v]] = -1;
            evicted_for_balloon++;
            page_free((void *)frame_addr[v]);
            /* The last frame moves into the victim's slot. */
            frame_addr[v] = frame_addr[last];
            frame_page[v] = frame_page[last];
            frame_ref[v] = frame_ref[last];
            if (v != last) where[frame_page[v]] = (int32_t)v;
            resident--;
        }
        nframes--;
        if (hand >= nframes) hand = 0;
    }
}

/* Every free pool page becomes an empty cache frame. */
static void take_frames(void) {
    void *p;
    while (nframes < FMAX && (p = page_alloc()) != 0) {
        frame_addr[nframes] = (uint64_t)p;
        frame_page[nframes] = -1;
        frame_ref[nframes] = 0;
        nframes++;
    }
}

/* Meets balloon target `t`: shrinks the cache first when the balloon grows. */
static uint32_t adjust(uint32_t t) {
    uint32_t a = balloon_actual();
    if (t > a) {
        uint32_t need = t - a, have = page_pool_free_pages();
        if (need > have) give_frames(need - have);
    }
    uint32_t actual = balloon_poll(&bd, 0);
    take_frames();
    return actual;
}

struct job { const struct sv_boot_info *bi; int status; };

static void workload(void *arg) {
    struct job *job = arg;
    W = (uint32_t)sv_cmdline_u64("pages", 1024);
    uint64_t accesses = sv_cmdline_u64("accesses", 20000);
    uint64_t warm = sv_cmdline_u64("warm", accesses / 4);
    uint64_t smilli = sv_cmdline_u64("smilli", 1000);
    uint64_t phases = sv_cmdline_u64("phases", 0);
    rng = sv_cmdline_u64("seed", 1);
    if (W < 2 || W > WMAX || smilli == 0 || smilli > 4000) {
        sv_printf("zipf-cache: need 2 <= pages <= %u and 0 < smilli <= 4000\n", WMAX);
        job->status = 4;
        return;
    }
    if (virtio_open(&blk, VIRTIO_ID_BLOCK, 0, 0, 1, 0)) {
        sv_printf("zipf-cache: no usable virtio-blk device\n");
        job->status = 2;
        return;
    }
    if (virtio_blk_capacity(&blk) < (uint64_t)W * SECTORS_PER_PAGE) {
        sv_printf("zipf-cache: the disk holds %lu pages, fewer than %u\n",
                  (unsigned long)(virtio_blk_capacity(&blk) / SECTORS_PER_PAGE), W);
        job->status = 4;
        return;
    }
    /* Zipf(s) weights k^-s = 2^(-s log2 k) in Q16.48, summed. */
    uint64_t total = 0;
    for (uint32_t k = 0; k < W; k++) {
        total += pow2_neg_q48(log2_q32(k + 1) * smilli / 1000);
        cdf[k] = total;
        where[k] = -1;
    }
    int pool = page_pool_init(sv_image_end(), job->bi->ram_size);
    if (pool <= 0) { sv_printf("zipf-cache: no free RAM for a page pool\n"); job->status = 4; return; }
    take_frames();
    /* Warm start: the most popular pages, as many as fit. */
    while (resident < nframes && resident < W) {
        uint32_t f = resident++;
        load(f, f);
        frame_ref[f] = 0;  /* prefetched, not referenced: CLOCK learns popularity from the accesses */
        check_stamp(f, f);
    }
    if (balloon_open(&bd, 0)) { sv_printf("zipf-cache: no usable virtio-balloon device\n"); job->status = 3; return; }
    uint64_t p1 = (cdf[0] >> 16) * 1000000 / (total >> 16);
    sv_printf("zipf-cache: %u pages, s=%lu/1000, %lu accesses (+%lu warm-up) per phase, pool %d pages, cache %u frames, "
              "top page %lu ppm, cpl%u, polling\n",
              W, (unsigned long)smilli, (unsigned long)accesses, (unsigned long)warm, pool, nframes, (unsigned long)p1, sv_cpl());
    sv_outl(SV_MARK_PORT, MARK_READY | (nframes + page_pool_free_pages()));

    uint32_t t = balloon_target(&bd);
    for (uint32_t phase = 0; t != BALLOON_QUIT; phase++) {
        uint64_t evicted_before = evicted_for_balloon;
        uint32_t actual = adjust(t);
        for (uint64_t i = 0; i < warm; i++) access_page(draw());
        misses = 0;
        uint64_t bad_before = bad;
        for (uint64_t i = 0; i < accesses; i++) access_page(draw());
        sv_printf("phase %u balloon=%u cache=%u resident=%u accesses=%lu misses=%lu evicted=%lu bad=%lu\n", phase, actual,
                  nframes, resident, (unsigned long)accesses, (unsigned long)misses,
                  (unsigned long)(evicted_for_balloon - evicted_before), (unsigned long)(bad - bad_before));
        sv_outl(SV_MARK_PORT, phase);
        if (phases && phase + 1 >= phases) break;
        t = balloon_wait_target(&bd, t);
    }
    sv_printf("zipf-cache: done, %u pages in the balloon, %lu bad stamps\n", balloon_actual(), (unsigned long)bad);
    job->status = bad ? 5 : 0;
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    if (cpu != 0) return 0;
    struct job job = { bi, 0 };
    sv_run_user(workload, &job);
    return job.status;
}
