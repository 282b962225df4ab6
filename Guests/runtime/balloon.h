/* virtio-balloon driver (device ID 5, virtio spec 5.5) and the page pool it inflates
 * from. One balloon per guest: the driver keeps its state in balloon.c.
 *
 * The pool hands out 4 KiB pages of a RAM region the guest names (typically from
 * sv_image_end() to the end of RAM). Its bookkeeping is two bitmaps kept in the first
 * pages of that region (never handed out), not inside the pages it manages, so a page in
 * the balloon is not touched by the guest until it has been deflated (it then reads as
 * zeros: the host discarded it).
 *
 * Host convention: a target (num_pages) of BALLOON_QUIT asks the guest to stop; the
 * driver never inflates toward it. */
#ifndef SV_BALLOON_H
#define SV_BALLOON_H

#include "virtio.h"

#define BALLOON_PAGE_SIZE 4096u
#define BALLOON_BATCH 256u            /* PFNs per inflate/deflate buffer */
#define BALLOON_QUIT 0xFFFFFFFFu
/* Largest pool: 3 GiB of RAM (the ABI's maximum) in 4 KiB pages. */
#define BALLOON_POOL_MAX_PAGES (3u << 18)

#define VIRTIO_BALLOON_F_STATS_VQ (1ull << 1)

/* ---- page pool ---- */

/* First byte after the guest image (its .bss included); the linker script defines no end
 * symbol, see balloon.c. */
uint64_t sv_image_end(void);
/* Takes the whole 4 KiB pages inside [start, end) (at most BALLOON_POOL_MAX_PAGES),
 * using the first few for its bitmaps (one page per 16 MiB). Returns the number of pages
 * it can hand out, or -1 for a region too small. */
int page_pool_init(uint64_t start, uint64_t end);
void *page_alloc(void);               /* a free page, or NULL */
void page_free(void *page);           /* ignored unless an allocated page of the pool */
uint32_t page_pool_free_pages(void);
uint32_t page_pool_total_pages(void);
uint64_t page_pool_start(void);

/* ---- balloon driver ---- */

/* Finds the first virtio-balloon, negotiates VIRTIO_BALLOON_F_STATS_VQ when offered and
 * sets up inflateq, deflateq (and statsq, posting the first statistics). Call
 * page_pool_init first. Returns 0 or virtio_open's negative error. */
int balloon_open(struct virtio_dev *d, int use_interrupts);
uint32_t balloon_target(struct virtio_dev *d);   /* num_pages */
uint32_t balloon_actual(void);                   /* pages in the balloon (= `actual`) */
int balloon_has_stats(struct virtio_dev *d);
/* Reads num_pages (into *target when not NULL) and inflates or deflates toward it in
 * batches of BALLOON_BATCH PFNs, writing `actual` after each batch; a target beyond what
 * the pool can give stops when the pool is empty. BALLOON_QUIT changes nothing. Also
 * answers a pending statistics request. Returns the pages now in the balloon. */
uint32_t balloon_poll(struct virtio_dev *d, uint32_t *target);
/* Waits until num_pages differs from `seen` and returns it: sleeps until the next
 * interrupt (configuration change) or, when polling, spins on the register. Answers
 * statistics requests meanwhile. Returns with interrupts off. */
uint32_t balloon_wait_target(struct virtio_dev *d, uint32_t seen);
/* Refills and returns the statistics buffer if the device asked for it; 1 if it did. */
int balloon_service_stats(struct virtio_dev *d);

/* With `on`, each deflate request ends by reading the first word of its first page: the
 * host discarded it, so it must read zero (`stale` counts those that do not: the guest
 * still saw its old contents). Costs the host one page per request. */
void balloon_set_check(int on);

/* Totals since balloon_open. */
struct balloon_counters { uint64_t inflated, deflated, requests, stats_updates, checked, stale; };
void balloon_counters(struct balloon_counters *c);

#endif
