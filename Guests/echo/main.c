// summary: reads one line from the serial port and prints it back
// test-guest
#include "sv.h"

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    char line[128];
    unsigned n = 0;
    for (;;) {
        int c = sv_getc();
        if (c == '\n' || c == '\r') break;
        if (n < sizeof line - 1) line[n++] = (char)c;
    }
    line[n] = 0;
    sv_printf("echo: %s\n", line);
    return 0;
}
