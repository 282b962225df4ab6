import Devices
import Synchronization
import VirtCore

/// A PC as QEMU's `-machine pc` presents it to a kernel booted with `-kernel`: multiboot
/// entry, COM1, isa-debug-exit at 0xF4, fw_cfg at 0x510, the 8259 pair (its INTR on the boot CPU's LINT0), one
/// local APIC per vCPU (xAPIC page and x2APIC MSRs) with INIT/STARTUP for the application
/// processors (which wait in wait-for-SIPI), the I/O APIC, the 8254 PIT (and port 0x61), pc-testdev (its register, IRQ-line ports and device memory),
/// and PCI (`PCPlatformPCI`: host bridge, virtio-pci devices).
public enum PCPlatform {
    /// Builds the machine for a multiboot kernel. `modules`: multiboot modules (an initrd)
    /// with their command lines. `cpu`: the features a `-cpu` line may change.
    public static func machine(kernel: [UInt8], modules: [(bytes: [UInt8], commandLine: String)] = [],
                               configuration: MachineConfiguration, engine: any Engine, cpu: PCCPUFeatures = PCCPUFeatures(),
                               serialOutput: @escaping @Sendable (UInt8) -> Void) throws -> Machine {
        // A bzImage or vmlinux boots through the Linux boot protocol; anything else must be multiboot.
        let image: KernelImage = LinuxKernel.isBzImage(kernel) || LinuxKernel.isELF64(kernel)
            ? .linux(try LinuxKernel(bytes: kernel)) : .multiboot(try MultibootKernel(bytes: kernel))
        var config = configuration
        config.debugExitEncoding = true
        let apicSlot = LocalAPICSlot()
        config.hypercalls.register(LocalAPICSlot.kvmSendIPI) { call, vcpu in
            // KVM's convention: RBX, RCX the destination bitmap, RDX the lowest APIC ID, RSI the ICR.
            apicSlot.bank?.sendPVIPI(from: vcpu, low: call.rbx, high: call.rcx, minID: UInt32(truncatingIfNeeded: call.arg2),
                                     icr: call.arg1) ?? HypercallTable.unknownResult
        }
        let machine = try Machine(configuration: config, engine: engine, image: nil, serialOutput: serialOutput) { memory in
            let boot: VCPUState
            switch image {
            case let .linux(linux):
                boot = try linux.load(into: memory, commandLine: configuration.commandLine, initrd: modules.first?.bytes)
                try ACPITables.write(into: memory, vcpuCount: configuration.vcpuCount, ioapicID: UInt8(configuration.vcpuCount))
                try MPTable.write(into: memory, vcpuCount: configuration.vcpuCount, ioapicID: UInt8(configuration.vcpuCount))
            case let .multiboot(multiboot):
                boot = try multiboot.load(into: memory, commandLine: configuration.commandLine, modules: modules)
            }
            // Application processors get their state at STARTUP; until then they do not run.
            return [boot] + (1..<max(1, configuration.vcpuCount)).map { _ in MultibootKernel.startupState(vector: 0) }
        }
        try install(on: machine, linux: image.isLinux, cpu: cpu, hypercallTarget: apicSlot)
        return machine
    }

    /// Attaches the PC devices to `machine` (made, not yet running): for a freshly loaded
    /// kernel, and again for a restored snapshot or migrated VM before the devices get their
    /// saved states. `linux`: a Linux kernel (COM1's interrupt, the RTC and the ACPI PM blocks).
    /// `hypercallTarget`: where the configuration's PV send-IPI hypercall finds the APICs.
    @discardableResult
    static func install(on machine: Machine, linux: Bool, cpu: PCCPUFeatures, hypercallTarget: LocalAPICSlot?) throws -> PCPlatformDevices {
        let count = machine.configuration.vcpuCount
        try machine.attach(FirmwareConfig(ramSize: machine.configuration.memorySize, cpuCount: count),
                           firstPort: FirmwareConfig.port, count: FirmwareConfig.portCount)
        let pic = PIC8259()
        try machine.attach(pic.masterPorts, firstPort: PIC8259.masterPort, count: 2)
        try machine.attach(pic.slavePorts, firstPort: PIC8259.slavePort, count: 2)
        try machine.attach(pic.edgeLevelControl, firstPort: PIC8259.elcrPort, count: 2)
        let gate = StartupGate(vcpuCount: count)
        // The timers count on each vCPU's own TSC where the engine offers it (software engine).
        // (The machine owns the vCPUs and the APICs: weakly referenced here.)
        let guestClock = machine.allVCPUs.allSatisfy({ $0 is any PlatformTimerForwarding })
            ? LocalAPICGuestClock(now: { [weak machine] in (machine?.allVCPUs[$0] as? any PlatformTimerForwarding)?.timeStampCounter ?? 0 },
                                  arm: { [weak machine] in (machine?.allVCPUs[$0] as? any PlatformTimerForwarding)?.setTimerDeadline($1) })
            : nil
        let apic = LocalAPICBank(vcpuCount: count, x2APIC: cpu.x2APIC, wiring: LocalAPICWiring(
            deliver: { [weak machine] vcpu, vector in machine?.raiseInterrupt(vector: vector, vcpu: vcpu) },
            initCPU: { vcpu in gate.initCPU(vcpu) },
            startup: { vcpu, vector in gate.startup(vcpu, vector: vector) },
            guestClock: guestClock,
            externalInterrupt: { [weak machine] vcpu, asserted in machine?.setExternalInterruptRequest(asserted, vcpu: vcpu) }))
        machine.localAPIC = apic
        // The 8259's INTR is the boot CPU's LINT0; its vector comes from the 8259's acknowledge.
        pic.connectOutput { [weak apic] level in apic?.setLINT0(level) }
        apic.connectExternalInterruptController { [weak pic] in pic?.acknowledge() ?? 0x0F }
        for vcpu in machine.allVCPUs { (vcpu as? any ExternalInterruptInput)?.setExternalInterruptController(apic) }
        // The 8254 counts on the reading vCPU's TSC where the timers do (so Linux calibrates
        // the TSC at its true rate), host time otherwise; IRQ0 is ISA IRQ 0, GSI 0.
        let pitClock: @Sendable () -> UInt64
        if let guestClock { pitClock = { guestClock.now(VCPUThread.current ?? 0) } } else { pitClock = { monotonicNanoseconds() } }
        let pit = ProgrammableIntervalTimer(now: pitClock)
        try machine.attach(pit, firstPort: ProgrammableIntervalTimer.port, count: ProgrammableIntervalTimer.portCount)
        try machine.attach(ProgrammableIntervalTimer.SystemControlPort(pit: pit), firstPort: ProgrammableIntervalTimer.SystemControlPort.port, count: 1)
        hypercallTarget?.bank = apic
        machine.pcPCI = try PCPlatformPCI(machine: machine, apic: apic)
        let ioapic = IOAPIC(apics: apic)
        try machine.attach(ioapic, base: IOAPIC.base, size: IOAPIC.size)
        let lines = PCInterruptLines(pic: pic, ioapic: ioapic)
        pit.connectIRQ0 { level in lines.set(ProgrammableIntervalTimer.irq, level) }
        try machine.attach(PCTestDevice.InterruptLines(lines: lines), firstPort: PCTestDevice.irqPort, count: IOAPIC.pins)
        try machine.attach(PCTestDevice.Register(), firstPort: PCTestDevice.registerPort, count: PCTestDevice.registerPortCount)
        try machine.attach(PCTestDevice.Memory(), base: PCTestDevice.memoryBase, size: PCTestDevice.memorySize)
        var linuxDevices: (CMOSClock, ACPIPowerManagement)?
        if linux {
            // Linux's 8250 driver wants COM1's interrupt; kvm-unit-tests poll the UART, and
            // an interrupt per transmitted byte only slows their output.
            machine.uart.connectInterruptLine { level in lines.set(UART16550.com1IRQ, level) }
            let cmos = CMOSClock()
            try machine.attach(cmos, firstPort: CMOSClock.port, count: 2)
            let pm = ACPIPowerManagement(sleepTypeS5: ACPITables.sleepTypeS5) { [weak machine] in machine?.requestStop(.exitPort(status: 0)) }
            try machine.attach(pm, firstPort: ACPIPowerManagement.eventBlock, count: ACPIPowerManagement.portCount)
            linuxDevices = (cmos, pm)
        }
        machine.startupGate = count > 1 ? gate : nil
        machine.addMessageSignalledInterruptSource()
        let msrs = PCPlatformMSRs(apic: apic, vcpuCount: count)
        for vcpu in machine.allVCPUs {
            if let forwarding = vcpu as? any PlatformMSRForwarding {
                forwarding.setPlatformMSRHandler(msrs)
                forwarding.setInterruptController(apic)
            }
        }
        let devices = PCPlatformDevices(linux: linux, cpu: cpu, localAPICs: apic, ioapic: ioapic, pit: pit, pic: pic,
                                        cmos: linuxDevices?.0, powerManagement: linuxDevices?.1, startupGate: gate,
                                        com1: linux ? machine.uart : nil)
        machine.pcPlatform = devices
        return devices
    }
}

/// The platform MSRs: the local APICs'; IA32_MCG_CAP (0x179: no banks, read-only); IA32_MISC_ENABLE (0x1A0; BTS and PEBS unavailable,
/// read-only, as KVM presents it); and the four legacy AMD performance counters
/// (0xC0010000–0xC0010007), which keep what is written but do not count — a guest that is
/// not on Intel resets them at boot.
final class PCPlatformMSRs: PlatformMSRHandler {
    static let counters: ClosedRange<UInt32> = 0xC001_0000...0xC001_0007
    static let miscEnable: UInt32 = 0x1A0
    static let machineCheckCapabilities: UInt32 = 0x179
    /// Performance monitoring available (7), BTS (11) and PEBS (12) unavailable: read-only.
    static let miscEnableFixed: UInt64 = 0x1880
    let apic: LocalAPICBank
    private final class Bank: Sendable {
        let values = Mutex([UInt64](repeating: 0, count: 8))
        let miscEnable = Mutex<UInt64>(0x1800)
    }
    private let banks: [Bank]

    init(apic: LocalAPICBank, vcpuCount: Int) {
        self.apic = apic
        banks = (0..<vcpuCount).map { _ in Bank() }
    }

    var x2APICAvailable: Bool { apic.x2APICAvailable }

    func readMSR(vcpu: Int, index: UInt32, tsc: UInt64, apicBase: UInt64) -> UInt64? {
        if Self.counters.contains(index), vcpu < banks.count { return banks[vcpu].values.withLock { $0[Int(index & 7)] } }
        if index == Self.miscEnable, vcpu < banks.count { return banks[vcpu].miscEnable.withLock { $0 } }
        if index == Self.machineCheckCapabilities { return 0 }  // no machine-check banks
        return apic.readMSR(vcpu: vcpu, index: index, tsc: tsc, apicBase: apicBase)
    }

    func writeMSR(vcpu: Int, index: UInt32, value: UInt64, tsc: UInt64, apicBase: UInt64) -> Bool {
        if Self.counters.contains(index), vcpu < banks.count {
            banks[vcpu].values.withLock { $0[Int(index & 7)] = value }
            return true
        }
        if index == Self.miscEnable, vcpu < banks.count {
            banks[vcpu].miscEnable.withLock { $0 = (value & ~Self.miscEnableFixed) | ($0 & Self.miscEnableFixed) }
            return true
        }
        return apic.writeMSR(vcpu: vcpu, index: index, value: value, tsc: tsc, apicBase: apicBase)
    }
}

/// What `--kernel` names: a Linux kernel (bzImage or vmlinux) or a multiboot kernel.
private enum KernelImage {
    case linux(LinuxKernel)
    case multiboot(MultibootKernel)

    var isLinux: Bool { if case .linux = self { true } else { false } }
}

/// The local APICs for KVM's PV send-IPI hypercall, whose handler is registered before the
/// machine (and so its APICs) exists.
final class LocalAPICSlot: Sendable {
    /// KVM_HC_SEND_IPI.
    static let kvmSendIPI: UInt64 = 10
    private let slot = Mutex<LocalAPICBank?>(nil)
    var bank: LocalAPICBank? {
        get { slot.withLock { $0 } }
        set { slot.withLock { $0 = newValue } }
    }
}
