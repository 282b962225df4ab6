/* Driver for the emulated NIC (SV_DEV_EMULATED_NIC; Sources/Devices/EmulatedNIC.swift):
 * each packet is programmed through MMIO registers and completed by polling STATUS. */
#ifndef SV_NIC_H
#define SV_NIC_H
#include "sv.h"

struct nic { uint64_t base; unsigned irq; };

int nic_open(struct nic *n, unsigned index);              /* 0, or -1 when absent */
void nic_mac(struct nic *n, uint8_t mac[6]);
int nic_send(struct nic *n, const void *frame, uint32_t len);   /* 0, or -1 on device error */
/* Copies a waiting frame into buf; returns its length, or -1 when none waits. */
int nic_recv(struct nic *n, void *buf, uint32_t cap);
#endif
