// summary: prints a greeting with the RAM size and vCPU count, exits 0
#include "sv.h"

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    if (cpu != 0) return 0;
    sv_printf("Hello from Swiftvisor! %lu MiB RAM, %u vCPU%s\n",
              bi->ram_size >> 20, bi->vcpu_count, bi->vcpu_count == 1 ? "" : "s");
    return 0;
}
