/* Guest-side virtio 1.x over virtio-mmio: transport, split virtqueues, and drivers for
 * block, net and console. Drivers run at CPL0 and wait for the device either by polling
 * the used ring or by sleeping until its interrupt (sv_wait_for_interrupt). */
#ifndef SV_VIRTIO_H
#define SV_VIRTIO_H

#include "sv.h"

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_BALLOON 5

#define VQ_SIZE 64

struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct vring_avail { uint16_t flags; uint16_t idx; uint16_t ring[VQ_SIZE]; uint16_t used_event; };
struct vring_used_elem { uint32_t id; uint32_t len; };
struct vring_used { uint16_t flags; uint16_t idx; struct vring_used_elem ring[VQ_SIZE]; uint16_t avail_event; };

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct virtq {
    struct vring_desc desc[VQ_SIZE] __attribute__((aligned(16)));
    struct vring_avail avail __attribute__((aligned(2)));
    struct vring_used used __attribute__((aligned(4)));
    uint16_t size, free_head, num_free, last_used;
    void *cookie[VQ_SIZE];
};

struct virtio_dev {
    uint64_t base;
    unsigned irq;
    uint32_t device_id;
    uint64_t features;       /* negotiated */
    int use_interrupts;
    unsigned nqueues;
    struct virtq *q[3];
    uint64_t notifies, interrupts;
    unsigned net_slot;       /* net: which static buffer set is this device's */
};

/* One buffer of a request: guest address, length, and whether the device writes it. */
struct virtio_buf { const void *addr; uint32_t len; int device_writes; };

/* Finds the n-th virtio-mmio device with `device_id`, resets it and negotiates
 * VIRTIO_F_VERSION_1 plus the `wanted` features the device offers; sets up `nqueues`
 * queues (storage from a static pool). Returns 0, or a negative error:
 * -1 none found, -2 bad magic/version, -3 features refused, -4 queue unavailable. */
int virtio_open(struct virtio_dev *d, uint32_t device_id, unsigned n, uint64_t wanted, unsigned nqueues, int use_interrupts);
/* Adds a chain of `n` buffers (device-readable ones first); returns the head or -1 when full. */
int virtq_add(struct virtq *q, const struct virtio_buf *bufs, unsigned n, void *cookie);
void virtio_notify(struct virtio_dev *d, unsigned queue);
/* A used chain: its cookie and the bytes the device wrote; NULL when none is ready. */
void *virtq_get_used(struct virtq *q, uint32_t *len);
/* Waits until queue `queue` has a used chain (polling or sleeping for the interrupt). */
void virtio_wait_used(struct virtio_dev *d, unsigned queue);
/* Device-specific configuration space, read with volatile accesses. */
uint32_t virtio_config_read32(struct virtio_dev *d, unsigned offset);
uint8_t virtio_config_read8(struct virtio_dev *d, unsigned offset);
uint32_t virtio_status(struct virtio_dev *d);

/* Block: 512-byte sectors. Return 0 on success, the virtio status (1 IOERR, 2 UNSUPP), or
 * a negative value on a driver error. */
uint64_t virtio_blk_capacity(struct virtio_dev *d);
int virtio_blk_read_only(struct virtio_dev *d);
int virtio_blk_read(struct virtio_dev *d, uint64_t sector, void *buf, uint32_t sectors);
int virtio_blk_write(struct virtio_dev *d, uint64_t sector, const void *buf, uint32_t sectors);
int virtio_blk_flush(struct virtio_dev *d);

/* Net: frames without the virtio header. Receive buffers are posted at open. */
int virtio_net_open(struct virtio_dev *d, unsigned n, int use_interrupts);
void virtio_net_mac(struct virtio_dev *d, uint8_t mac[6]);
int virtio_net_send(struct virtio_dev *d, const void *frame, uint32_t len);
/* Copies the next received frame into buf (up to cap bytes); returns its length, or -1 when
 * none is waiting (with wait = 0). */
int virtio_net_recv(struct virtio_dev *d, void *buf, uint32_t cap, int wait);

/* Console: bytes out on the transmit queue; input through receive buffers. */
int virtio_console_write(struct virtio_dev *d, const void *bytes, uint32_t len);
/* Reads up to and including a newline (or cap bytes, or end of input); returns the count. */
unsigned virtio_console_read_line(struct virtio_dev *d, char *buf, unsigned cap);

#endif
