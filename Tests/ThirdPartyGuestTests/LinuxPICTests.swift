import Foundation
import TestSupport
import Testing

/// Debian's kernel booted with `noapic`: it leaves the I/O APIC alone and routes the ISA
/// interrupts through the 8259 pair, whose INTR reaches the boot CPU through its local
/// APIC's LINT0 programmed ExtINT; the vector comes from the 8259's acknowledge.
@Suite(.serialized, .enabled(if: LinuxGuest.available, LinuxGuest.skipReason))
struct LinuxPICTests {
    /// The shell answers what is typed on the console (COM1's IRQ 4 through the 8259),
    /// /proc/interrupts counts ttyS0 on the XT-PIC, and `poweroff` ends the VMM with status 0.
    /// `noapic`: the kernel programs LINT0 ExtINT itself and ticks with the local APIC's
    /// TSC-deadline timer (IRQ 0 unused); `noapic nolapic`: it never touches the local APIC,
    /// whose LINT0 passes the 8259 as at reset (virtual wire), and ticks on the 8254's IRQ 0.
    @Test(arguments: ["noapic", "noapic nolapic"])
    func shellRunsOnThe8259(options: String) throws {
        let files = try LinuxGuest.prepared.get()
        let run = try LinuxRun(files, cmdline: "console=ttyS0 \(options)")
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
        #expect(Self.count(of: "ttyS0", in: table) > 0, "ttyS0 not counted on the XT-PIC:\n\(table)")
        if options.contains("nolapic") { #expect(Self.count(of: "timer", in: table) > 0, "the timer not counted on the XT-PIC:\n\(table)") }
        try run.powersOffCleanly(after: last)
    }

    /// The count of the XT-PIC line named `name` in a /proc/interrupts listing (one CPU), or 0.
    static func count(of name: String, in table: String) -> Int {
        let line = table.split(whereSeparator: \.isNewline).first { $0.contains("XT-PIC") && $0.contains(" \(name)") }
        return line.flatMap { $0.split(separator: " ").dropFirst().first.flatMap { Int($0) } } ?? 0
    }
}
