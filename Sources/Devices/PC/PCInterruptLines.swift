/// A PC's interrupt lines as the chipset wires them: ISA IRQ n (0–15) drives 8259 input n
/// and I/O APIC pin n (GSI n; the MADT has no override), so whichever controller the guest
/// enables sees it; GSIs 16–23 reach the I/O APIC alone.
public final class PCInterruptLines: Sendable {
    private let pic: PIC8259
    private let ioapic: IOAPIC

    public init(pic: PIC8259, ioapic: IOAPIC) {
        self.pic = pic
        self.ioapic = ioapic
    }

    /// Drives line `gsi` at `level`.
    public func set(_ gsi: Int, _ level: Bool) {
        if gsi < 16 { pic.setIRQ(gsi, level) }
        ioapic.setLine(gsi, level)
    }
}
