#include "host_vcpu_thread.h"

static __thread int current_vcpu = -1;

void host_set_current_vcpu(int id) { current_vcpu = id; }

int host_current_vcpu(void) { return current_vcpu; }
