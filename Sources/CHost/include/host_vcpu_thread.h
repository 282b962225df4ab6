#pragma once

/* Which vCPU the calling thread runs (vcpu_thread.c): set once by each vCPU thread, read by
 * devices whose clock is the accessing vCPU's (the 8254's count on the software engine).
 * -1 on any other thread. */
void host_set_current_vcpu(int id);
int host_current_vcpu(void);
