// summary: virtio-console: writes a greeting through the virtio console, then echoes one line of its input back (run with --virtio-console)
#include "virtio.h"

static char line[256];

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    struct virtio_dev d;
    int r = virtio_open(&d, VIRTIO_ID_CONSOLE, 0, 0, 2, 1);
    if (r) { sv_printf("vconsole: no virtio console (%d); run with --virtio-console\n", r); return 2; }
    static const char hello[] = "Hello through virtio-console!\n";
    if (virtio_console_write(&d, hello, sizeof hello - 1)) return 3;
    unsigned n = virtio_console_read_line(&d, line, sizeof line);
    static const char prefix[] = "vconsole echo: ";
    virtio_console_write(&d, prefix, sizeof prefix - 1);
    virtio_console_write(&d, line, n);
    return 0;
}
