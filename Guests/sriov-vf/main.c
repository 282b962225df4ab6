// summary: S4 SR-IOV VF driver at CPL3, the VF found on the PCI bus: mode=0 peer=K count=N (ping: frames to VF K, each echoed), mode=1 count=N (pong: echoes; irq=1 sleeps on the VF's MSI-X interrupt between frames), mode=2 target=ADDR (attack: loopback, then receive into and transmit from ADDR)
#include "vf.h"

#define FRAME 128
#define BUF 2048
static uint8_t rx_buffers[VF_RING][BUF] __attribute__((aligned(4096)));
static uint8_t tx_frame[FRAME] __attribute__((aligned(64)));

struct job { struct vf vf; uint64_t mode, peer, count, target, irq, next; uint64_t sum; const char *result; unsigned status; };
#define VF_IRQ 14

static void set_mac(uint8_t *p, uint64_t mac) { for (int i = 0; i < 6; i++) p[i] = (uint8_t)(mac >> (8 * i)); }
static uint64_t vf_mac_of(uint64_t index) { return 0x02ull | (index + 1) << 40; }
static uint32_t frame_seq(const uint8_t *f) { return (uint32_t)f[14] | (uint32_t)f[15] << 8 | (uint32_t)f[16] << 16 | (uint32_t)f[17] << 24; }

/* Ethernet header (dst, src, ethertype 0x88B5), then seq and a pattern. */
static void build(uint64_t dst, uint64_t src, uint32_t seq, uint8_t fill) {
    set_mac(tx_frame, dst);
    set_mac(tx_frame + 6, src);
    tx_frame[12] = 0x88; tx_frame[13] = 0xB5;
    for (int i = 0; i < 4; i++) tx_frame[14 + i] = (uint8_t)(seq >> (8 * i));
    for (int i = 18; i < FRAME; i++) tx_frame[i] = (uint8_t)(fill + i);
}

static void post_all(struct vf *v) { for (int i = 0; i < VF_RING; i++) vf_post_rx_at(v, vf_dma_addr(v, rx_buffers[i]), BUF); }

/* The guest-physical buffer behind a device address the driver posted. */
static uint8_t *buffer_at(struct vf *v, uint64_t addr) { return (uint8_t *)(uintptr_t)(addr - v->regs->dma_base); }

static void ping(struct job *j) {
    struct vf *v = &j->vf;
    uint64_t self = v->regs->mac, dst = vf_mac_of(j->peer);
    for (uint32_t seq = 0; seq < j->count; seq++) {
        int answered = 0;
        for (int attempt = 0; attempt < 2000 && !answered; attempt++) {
            build(dst, self, seq, (uint8_t)seq);
            if (!(vf_send(v, tx_frame, FRAME) & VF_DONE)) { j->result = "send failed"; j->status = 3; return; }
            uint32_t len; uint64_t addr;
            uint16_t st;
            while ((st = vf_wait_rx(v, &len, &addr, 2000000)) != 0) {
                uint8_t *f = buffer_at(v, addr);
                uint32_t got = frame_seq(f);
                if (st == VF_DONE && got == seq) { answered = 1; for (uint32_t i = 18; i < len; i++) j->sum += f[i]; }
                vf_post_rx_at(v, addr, BUF);
                if (answered) break;
            }
        }
        if (!answered) { j->result = "no echo"; j->status = 4; return; }
    }
    j->result = "ok";
}

/* Echoes one received frame back to its sender (the sequence it expects is j->next). */
static void echo(struct job *j, uint32_t len, uint64_t addr) {
    struct vf *v = &j->vf;
    uint8_t *f = buffer_at(v, addr);
    uint32_t seq = frame_seq(f);
    uint64_t src = 0;
    for (int i = 0; i < 6; i++) src |= (uint64_t)f[6 + i] << (8 * i);
    if (seq == j->next) { for (uint32_t i = 18; i < len; i++) j->sum += f[i]; j->next++; }
    for (uint32_t i = 0; i < FRAME && i < len; i++) tx_frame[i] = f[i];
    set_mac(tx_frame, src);
    set_mac(tx_frame + 6, v->regs->mac);
    vf_post_rx_at(v, addr, BUF);
    if (!(vf_send(v, tx_frame, FRAME) & VF_DONE)) { j->result = "send failed"; j->status = 3; }
    else if (j->next == j->count) j->result = "ok";
}

/* Polled: spins for each frame. */
static void pong(struct job *j) {
    while (j->next < j->count && !j->status) {
        uint32_t len; uint64_t addr;
        if (!vf_wait_rx(&j->vf, &len, &addr, VF_SPIN_LIMIT)) { j->result = "timeout"; j->status = 4; return; }
        echo(j, len, addr);
    }
}

/* With interrupts: echoes what has arrived and returns; the kernel side sleeps until the
 * VF's receive interrupt (CPL3 cannot halt). */
static void pong_ready(struct job *j) {
    while (j->next < j->count && !j->status && vf_rx_ready(&j->vf)) {
        uint32_t len; uint64_t addr;
        if (!vf_wait_rx(&j->vf, &len, &addr, 1)) { j->result = "ring fault"; j->status = 4; return; }
        echo(j, len, addr);
    }
}

/* The attack: the guest names a device address outside its own memory (another VM's or
 * the VMM's, passed as target=) as a receive buffer and as a transmit buffer. */
static void attack(struct job *j) {
    struct vf *v = &j->vf;
    uint64_t self = v->regs->mac;
    uint32_t len; uint64_t addr;
    static char line[160];
    const char *loop = "failed", *rx = "?", *tx = "?";
    /* 1. Loopback through the VF's switch into an ordinary buffer. */
    vf_post_rx_at(v, vf_dma_addr(v, rx_buffers[0]), BUF);
    build(self, self, 1, 0x11);
    if (vf_send(v, tx_frame, FRAME) == VF_DONE && vf_wait_rx(v, &len, &addr, VF_SPIN_LIMIT) == VF_DONE
        && len == FRAME && frame_seq(rx_buffers[0]) == 1) loop = "ok";
    /* 2. Receive into the target: the device's write must be refused. */
    vf_post_rx_at(v, j->target, BUF);
    build(self, self, 2, 0x66);
    for (int i = 18; i < 26; i++) tx_frame[i] = (uint8_t)"PWNED!!!"[i - 18];
    uint16_t st = vf_send(v, tx_frame, FRAME);
    uint16_t rst = vf_wait_rx(v, &len, &addr, VF_SPIN_LIMIT);
    rx = !st || !rst ? "timeout" : (rst & VF_DMA_ERROR) ? "blocked" : "written";
    /* 3. Transmit from the target: the device's read must be refused. */
    st = vf_send_at(v, j->target, 64);
    tx = !st ? "timeout" : (st & VF_DMA_ERROR) ? "blocked" : "read";
    int n = 0;
    const char *parts[] = { "loopback=", loop, " rx-attack=", rx, " tx-attack=", tx };
    for (unsigned p = 0; p < 6; p++) for (const char *c = parts[p]; *c && n < 150; c++) line[n++] = *c;
    line[n] = 0;
    j->result = line;
}

static void run(void *arg) {
    struct job *j = arg;
    if (j->mode == 0) ping(j);
    else if (j->mode == 1 && j->irq) pong_ready(j);
    else if (j->mode == 1) pong(j);
    else attack(j);
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    static struct job j;
    if (vf_open(&j.vf, 0) != 0) { sv_printf("sriov-vf: no virtual function on the PCI bus\n"); return 2; }
    sv_printf("sriov-vf: VF at %02x:%02x.0, BAR0 0x%x (%u KiB)\n", j.vf.bus, j.vf.dev, (unsigned)(uintptr_t)j.vf.regs,
              (unsigned)(j.vf.bar0_size >> 10));
    j.mode = sv_cmdline_u64("mode", 0);
    j.peer = sv_cmdline_u64("peer", 0);
    j.count = sv_cmdline_u64("count", 10);
    j.target = sv_cmdline_u64("target", 0);
    j.irq = j.mode == 1 && sv_cmdline_u64("irq", 0);
    j.result = "?";
    if (j.irq && vf_irq_enable(&j.vf, VF_IRQ) != 0) { sv_printf("sriov-vf: the VF has no MSI-X capability\n"); return 2; }
    if (j.mode < 2) post_all(&j.vf);
    sv_run_user(run, &j);
    while (j.irq && j.next < j.count && !j.status) {
        vf_sleep_until_rx(&j.vf);
        sv_run_user(run, &j);
    }
    if (j.irq) sv_printf("sriov-vf: receive interrupts taken: %llu\n", (unsigned long long)sv_irq_count(VF_IRQ));
    sv_printf("sriov-vf: vf %u %s count=%llu sum=%llu: %s tx_errors=%u rx_errors=%u\n",
              (unsigned)j.vf.regs->vf_index, j.mode == 0 ? "ping" : j.mode == 1 ? "pong" : "attack",
              (unsigned long long)j.count, (unsigned long long)j.sum, j.result,
              (unsigned)j.vf.regs->tx_errors, (unsigned)j.vf.regs->rx_errors);
    return (int)j.status;
}
