import Foundation
import TestSupport
import Testing

/// Debian's kernel booted with `noapic`: it leaves the I/O APIC alone and routes the ISA
/// interrupts through the 8259 pair, whose INTR reaches the boot CPU through its local
/// APIC's LINT0 programmed ExtINT; the vector comes from the 8259's acknowledge.
@Suite(.serialized, .enabled(if: LinuxGuest.available, LinuxGuest.skipReason))
struct LinuxPICTests {
    /// The shell answers what is typed on the console (COM1's IRQ 4 through the 8259),
    /// /proc/interrupts counts the XT-PIC lines of the timer and ttyS0, and `poweroff` ends
    /// the VMM with status 0.
    @Test func noapicShellRunsOnThe8259() throws {
        let files = try LinuxGuest.prepared.get()
        let run = try LinuxRun(files, cmdline: "console=ttyS0 noapic")
        defer { run.kill() }
        let started = run.waitFor("Run /init as init process", seconds: 400)
        try #require(started != nil, "the kernel did not start /init:\n\(run.tail)")
        #expect(!run.text.contains("Using IOAPIC for interrupt routing"), "noapic ignored:\n\(run.tail)")
        let at = run.prompt(after: started)
        try #require(at != nil, "no shell prompt on ttyS0:\n\(run.tail)")
        let echoed = try run.answers([("echo ok-$((6*7))", "ok-42")], after: at)
        let listed = run.answer("cat /proc/interrupts", expecting: "ttyS0", after: echoed)
        try #require(listed != nil, "no ttyS0 in /proc/interrupts:\n\(run.tail)")
        let last = run.prompt(after: listed)
        try #require(last != nil, "no prompt after cat /proc/interrupts:\n\(run.tail)")
        let table = String(run.text[echoed!..<last!])
        for name in ["timer", "ttyS0"] {
            let line = table.split(separator: "\n").first { $0.contains("XT-PIC") && $0.contains(" \(name)") }
            let count = line.flatMap { $0.split(separator: " ").dropFirst().first.flatMap { Int($0) } }
            #expect((count ?? 0) > 0, "\(name) not counted on the XT-PIC:\n\(table)")
        }
        try run.powersOffCleanly(after: last)
    }
}
