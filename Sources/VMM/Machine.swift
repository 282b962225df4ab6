import Devices
import Dispatch
import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// What a machine is built with.
public struct MachineConfiguration: Sendable {
    public var memorySize: UInt64 = 64 << 20
    public var vcpuCount = 1
    public var commandLine = ""
    /// Stop the VM after this many seconds (nil: no limit).
    public var timeoutSeconds: Double?
    /// Keep every exit of every vCPU in `RunResult.exitTrace` (for differential tests).
    public var recordExits = false
    /// A periodic tick on vCPU 0, for VMM work done at timer exits (`Machine.onTick`):
    /// on KVM a host timer kicks the vCPU out every `tickSeconds`; the software engine
    /// uses its preemption timer, every `tickInstructions` guest instructions.
    public var tickSeconds: Double?
    public var tickInstructions: UInt64 = 100_000
    /// KVM: deliver virtio queue notifications through ioeventfds (handled in the kernel
    /// and a doorbell thread, no exit to userspace) when the host supports them.
    public var ioeventfd = true
    /// What the guest is (a bundled guest's name or a path), kept in snapshots.
    public var guestName = ""
    /// The VMM's answers to the guest's hypercalls.
    public var hypercalls = HypercallTable()
    /// Second-level translation: nested (the engine walks guest tables and the second
    /// level) or shadow (the VMM's `ShadowPager` keeps shadow tables; software engine).
    public var paging: PagingMode = .nested
    /// Runs first on each vCPU's thread (with the vCPU index): pinning, scheduling policy
    /// (see `Partitioning.threadSetup`). An error stops the machine before that vCPU runs.
    public var vcpuThreadSetup: (@Sendable (Int) throws -> Void)?
    /// Port 0xF4 as QEMU's isa-debug-exit (status `(value << 1) | 1`) instead of the plain exit port.
    public var debugExitEncoding = false
    /// A confidential VM (S11, docs/confidential-vm.md): memory encrypted by the engine,
    /// launched and measured at `run()`; nil: an ordinary VM.
    public var confidential: ConfidentialMode?
    /// Pages of a confidential VM's decrypted working set.
    public var workingSetPages = 1024

    public init(memorySize: UInt64 = 64 << 20, vcpuCount: Int = 1, commandLine: String = "",
                timeoutSeconds: Double? = nil, recordExits: Bool = false, guestName: String = "") {
        self.memorySize = memorySize; self.vcpuCount = vcpuCount; self.commandLine = commandLine
        self.timeoutSeconds = timeoutSeconds; self.recordExits = recordExits; self.guestName = guestName
    }
}

public enum MachineError: Error, Equatable, CustomStringConvertible {
    case invalidMemorySize(UInt64)
    case invalidVCPUCount(Int)
    case commandLineTooLong(Int)
    case alreadyRan
    case alreadyStarted
    case tooManyDevices

    public var description: String {
        switch self {
        case let .invalidMemorySize(size):
            return "memory size \(MemorySize.format(size)) is outside \(MemorySize.format(BootLayout.minRAM))–\(MemorySize.format(BootLayout.maxRAM)) or not a multiple of 2 MiB"
        case let .invalidVCPUCount(n):
            return "vCPU count \(n) is outside 1–\(BootLayout.maxVCPUs)"
        case let .commandLineTooLong(n):
            return "guest command line of \(n) bytes exceeds \(BootLayout.commandLineCapacity)"
        case .alreadyRan:
            return "a machine runs once; build a new one"
        case .alreadyStarted:
            return "devices are attached before the machine runs"
        case .tooManyDevices:
            return "a machine has at most \(BootLayout.maxDevices) devices"
        }
    }
}

/// Why a machine stopped.
public enum StopReason: Sendable, Equatable {
    /// The guest wrote its exit status to the exit port.
    case exitPort(status: UInt8)
    /// Every vCPU executed `hlt` with nothing left to wake it.
    case allHalted
    /// A vCPU triple-faulted (or otherwise shut down); its state at that point.
    case shutdown(vcpu: Int, state: VCPUState?)
    case timeout
    /// `Machine.stop()` was called.
    case stopped
    /// The engine could not run the guest: KVM internal error, failed entry, ioctl error.
    case engineFailure(vcpu: Int, failure: EngineFailure)
    /// The machine moved to another host (live migration); the guest runs on there.
    case migrated(destination: String)

    /// One line for the user.
    public var summary: String {
        switch self {
        case let .exitPort(status): return "guest exited with status \(status)"
        case .allHalted: return "all vCPUs halted"
        case let .shutdown(vcpu, _): return "vCPU \(vcpu) shut down (triple fault)"
        case .timeout: return "timed out"
        case .stopped: return "stopped by the host"
        case let .engineFailure(vcpu, failure): return "vCPU \(vcpu): \(failure)"
        case let .migrated(destination): return "migrated to \(destination)"
        }
    }
}

public struct RunResult: Sendable {
    public var stopReason: StopReason
    /// All vCPUs' exit statistics merged.
    public var statistics: ExitStatistics
    public var perVCPUStatistics: [ExitStatistics]
    public var wallNanoseconds: UInt64
    /// Per vCPU, every exit in order (only with `recordExits`).
    public var exitTrace: [[VMExit]]
}

/// One running VM: guest RAM, an engine VM with its vCPUs, and the I/O bus with the
/// standard devices (COM1, exit port, bench port). `run()` starts one thread per vCPU
/// and returns when the guest exits, fails, times out or is stopped.
// SAFETY: what changes after init is either behind a lock or an atomic (bus assembly, stop and
// pause state, fault handler) or set only before `run()` starts the vCPU threads (device list,
// balloon, lazy loader, doorbells), which publishes it to them.
public final class Machine: @unchecked Sendable {
    public let configuration: MachineConfiguration
    public let memory: GuestMemory
    public let engine: any Engine
    public let vm: any VM
    /// Devices are attached while the machine is assembled; `run()` freezes the bus.
    private enum BusState { case assembling(IOBusBuilder), frozen(IOBus) }
    private let busState: Mutex<BusState>
    public let uart: UART16550
    public let benchPort = BenchPort()
    /// Written by the guest runtime's first instruction (start-up measurement).
    public let bootMarker = BootMarkerPort()
    /// The exit statistics so far, while the machine runs (published by the run loops).
    public let liveExits = LiveExitStatistics()
    /// The image the machine booted (nil when restored from a snapshot).
    public let image: ELFImage?
    /// A confidential VM's launch measurement (set by `run()` before the guest starts).
    public private(set) var launchMeasurement: LaunchMeasurement?
    /// Called with it, before any vCPU runs (to sign an attestation report, say).
    public var onLaunch: (@Sendable (LaunchMeasurement) -> Void)?
    /// Timer exits taken for `onTick`.
    public var ticks: UInt64 { tickCount.load(ordering: .relaxed) }
    private let tickCount = Atomic<UInt64>(0)

    private let vcpus: [any VCPU]
    /// Shadow mode's page-table keeper (nil in nested mode).
    public let shadowPager: ShadowPager?
    private let stopRequested = Atomic<Bool>(false)
    private let stopState = Mutex<StopReason?>(nil)
    private let haltedCount = Atomic<Int>(0)
    private let started = Atomic<Bool>(false)
    /// Per vCPU: signalled when an interrupt is injected or the machine stops, for a vCPU
    /// waiting in `hlt`.
    private let wakeups: [DispatchSemaphore]
    /// Devices attached so far (boot-info entries and MMIO slots).
    private var deviceCount = 0
    /// Devices that can interrupt: with none, `hlt` with IF set halts for good.
    private var interruptSources = 0
    /// Pausing: vCPUs park at their next exit until `resume()`.
    private let pauseRequested = Atomic<Bool>(false)
    private let parkedCount = Atomic<Int>(0)
    private let finishedCount = Atomic<Int>(0)
    private let parkedSignal = DispatchSemaphore(value: 0)
    /// Signalled by a vCPU leaving its park, for `resume()` to wait on.
    private let unparkedSignal = DispatchSemaphore(value: 0)
    private let resumeSignals: [DispatchSemaphore]
    private let pauseLock = Mutex(())
    /// Called on a vCPU's thread for a `.memoryFault` exit (an EPT violation of the
    /// software engine); true: handled, run on. Set while a service (a copy-on-write
    /// snapshot) has pages protected.
    let memoryFaultHandler = LockedFunction<@Sendable (UInt64, MemoryAccessKind) -> Bool>()
    /// MMIO devices in slot order, with how to make each again.
    var attachedDevices: [AttachedDevice] = []
    /// The machine's virtio-balloon, if it has one (the control socket's `balloon` command).
    public internal(set) var balloon: VirtioBalloon?
    /// Fills RAM on first touch for a lazily restored machine (nil otherwise).
    var lazyLoader: LazyMemoryLoader?
    /// Faults a lazy restore has served so far (guest accesses that waited for a page).
    public var lazyRestoreFaults: UInt64 { lazyLoader?.counters.faults.load(ordering: .relaxed) ?? 0 }
    /// Lazy restore: pages placed in RAM so far (the faulting ones and their chunks' other non-zero pages).
    public var lazyRestorePagesLoaded: UInt64 { lazyLoader?.counters.pagesLoaded.load(ordering: .relaxed) ?? 0 }
    /// KVM ioeventfd doorbells of virtio devices (nil: none, or not KVM).
    var doorbells: DoorbellThread?
    /// Held while the machine migrates out (one migration at a time).
    let migrationGuard = MigrationGuard()
    /// Set when an outgoing post-copy migration broke after the switch-over.
    let postcopyRecovery = Mutex<PostcopyRecoveryState?>(nil)
    /// Fills RAM from the source for a machine that arrived by post-copy (nil otherwise).
    var postcopyReceiver: PostcopyReceiver?
    /// Whether every page of a post-copied machine has arrived.
    public var postcopyFinished: Bool { postcopyReceiver?.finished.load(ordering: .acquiring) ?? true }
    /// virtio queue notifications taken by ioeventfd instead of an exit.
    public var doorbellNotifications: UInt64 { doorbells?.notifications.load(ordering: .relaxed) ?? 0 }

    /// Builds the machine: validates the configuration, loads `image`, writes boot state
    /// and sets every vCPU to the ABI entry state. `serialOutput` receives COM1 bytes.
    public convenience init(image: ELFImage, configuration: MachineConfiguration, engine: any Engine,
                            serialOutput: @escaping @Sendable (UInt8) -> Void) throws {
        try self.init(configuration: configuration, engine: engine, image: image, serialOutput: serialOutput) { memory in
            try BootLayout.prepare(memory: memory, vcpuCount: configuration.vcpuCount,
                                   commandLine: configuration.commandLine, hypercall: engine.hypercallMechanism)
            try image.load(into: memory)
            return (0..<configuration.vcpuCount).map { BootLayout.initialState(vcpu: $0, entry: image.entry) }
        }
    }

    /// Builds a machine whose RAM and vCPU states come from `contents` — a restored
    /// snapshot, say. `contents` fills the fresh RAM (or arranges for it to be filled on
    /// demand) and returns one state per vCPU; it runs before the engine VM exists.
    /// `preparedMemory`, when given, is fresh RAM of exactly the configured size made ahead
    /// of time (preallocated by a migration destination); it must not have been used.
    public init(configuration: MachineConfiguration, engine: any Engine, image: ELFImage? = nil,
                preparedMemory: GuestMemory? = nil,
                serialOutput: @escaping @Sendable (UInt8) -> Void,
                contents: (GuestMemory) throws -> [VCPUState]) throws {
        let size = configuration.memorySize
        guard size >= BootLayout.minRAM, size <= BootLayout.maxRAM, size % (2 << 20) == 0 else {
            throw MachineError.invalidMemorySize(size)
        }
        guard configuration.vcpuCount >= 1, configuration.vcpuCount <= BootLayout.maxVCPUs else {
            throw MachineError.invalidVCPUCount(configuration.vcpuCount)
        }
        guard configuration.commandLine.utf8.count <= BootLayout.commandLineCapacity else {
            throw MachineError.commandLineTooLong(configuration.commandLine.utf8.count)
        }
        self.configuration = configuration
        self.image = image
        self.engine = engine
        if let preparedMemory, preparedMemory.size == size {
            memory = preparedMemory
        } else {
            memory = try GuestMemory(size: size)
        }
        let states = try contents(memory)
        guard states.count == configuration.vcpuCount else { throw MachineError.invalidVCPUCount(states.count) }
        var vmConfig = VMConfig(vcpuCount: configuration.vcpuCount, confidential: configuration.confidential)
        vmConfig.workingSetPages = configuration.workingSetPages
        vm = try engine.makeVM(memory: memory, config: vmConfig)
        if configuration.confidential != nil {
            _ = try vm.require((any EncryptedMemory).self, .encryptedMemory, neededBy: "a confidential VM")
            guard image != nil, configuration.paging == .nested else {
                throw ConfidentialError("a confidential VM boots from an image with nested paging (no restore, no shadow paging)")
            }
        }
        var vcpus: [any VCPU] = []
        for id in 0..<configuration.vcpuCount {
            let vcpu = try vm.makeVCPU(id: id)
            try vcpu.setState(states[id])
            vcpus.append(vcpu)
        }
        self.vcpus = vcpus
        shadowPager = try configuration.paging == .shadow ? ShadowPager.attach(to: vm, vcpus: vcpus) : nil
        wakeups = vcpus.map { _ in DispatchSemaphore(value: 0) }
        resumeSignals = vcpus.map { _ in DispatchSemaphore(value: 0) }
        uart = UART16550(output: serialOutput)
        var builder = IOBusBuilder()
        try builder.attach(uart, firstPort: UART16550.com1, count: UART16550.registerCount)
        try builder.attach(benchPort, firstPort: BenchPort.port, count: 1)
        try builder.attach(bootMarker, firstPort: BootMarkerPort.port, count: 1)
        busState = Mutex(.assembling(builder))
        let onExit: @Sendable (UInt8) -> Void = { [weak self] status in self?.requestStop(.exitPort(status: status)) }
        if configuration.debugExitEncoding {
            try attach(DebugExitPort(onExit: onExit), firstPort: DebugExitPort.port, count: 1)
        } else {
            try attach(ExitPort(onExit: onExit), firstPort: ExitPort.port, count: 1)
        }
    }

    /// Attaches a port-I/O device. Before `run()` only: the bus is frozen once guest code runs.
    public func attach(_ device: any PortIODevice, firstPort: UInt16, count: Int) throws {
        try assemble { builder in try builder.attach(device, firstPort: firstPort, count: count) }
    }

    /// Attaches an MMIO device at a fixed address (outside the device-slot window). Before
    /// `run()` only.
    public func attach(_ device: any MMIODevice, base: UInt64, size: UInt64) throws {
        try assemble { builder in try builder.attach(device, base: base, size: size) }
    }

    private func assemble(_ change: (inout IOBusBuilder) throws -> Void) throws {
        try busState.withLock { state in
            guard case var .assembling(builder) = state else { throw MachineError.alreadyStarted }
            try change(&builder)
            state = .assembling(builder)
        }
    }

    /// The I/O bus: once the machine runs, the one its vCPUs use; before, the devices so far.
    public var bus: IOBus {
        busState.withLock { state in
            switch state {
            case let .assembling(builder): return builder.freeze()
            case let .frozen(bus): return bus
            }
        }
    }

    /// Freezes the bus for the run (idempotent).
    private func freezeBus() -> IOBus {
        busState.withLock { state in
            switch state {
            case let .assembling(builder):
                let bus = builder.freeze()
                state = .frozen(bus)
                return bus
            case let .frozen(bus): return bus
            }
        }
    }

    /// Asks every vCPU to stop; the first reason given wins. Safe from any thread.
    public func requestStop(_ reason: StopReason) {
        stopState.withLock { if $0 == nil { $0 = reason } }
        stopRequested.store(true, ordering: .releasing)
        for v in vcpus { v.requestExit() }
        for w in wakeups { w.signal() }
    }

    public func stop() { requestStop(.stopped) }

    /// Why the machine ended (or is ending): the guest exited or halted, the host stopped it,
    /// it moved away. nil while it can still run; a machine that ended cannot run again.
    public var endReason: StopReason? { stopState.withLock { $0 } }

    /// Stops every vCPU at its next exit and returns once all are parked (or finished):
    /// their state can then be read and memory changed consistently. Any thread but a
    /// vCPU's; pair with `resume()`.
    public func pause() {
        pauseLock.withLock { _ in
            guard !pauseRequested.exchange(true, ordering: .acquiringAndReleasing) else { return }
            for v in vcpus { v.requestExit() }
            for w in wakeups { w.signal() }
            while parkedCount.load(ordering: .acquiring) + finishedCount.load(ordering: .acquiring) < vcpus.count,
                  started.load(ordering: .acquiring) {
                _ = parkedSignal.wait(timeout: .now() + .milliseconds(50))  // re-check: a vCPU may finish instead
            }
            (vm as? any EncryptedMemory)?.flushWorkingSet()  // no plaintext outside the guest while it is paused
        }
    }

    /// Lets paused vCPUs run on. Returns once every parked vCPU has left its park, so a
    /// `pause()` right after cannot count a vCPU still on its way out as parked (and find
    /// it running guest code after it returned).
    public func resume() {
        pauseLock.withLock { _ in
            guard pauseRequested.exchange(false, ordering: .acquiringAndReleasing) else { return }
            for r in resumeSignals { r.signal() }
            while parkedCount.load(ordering: .acquiring) > 0 {
                _ = unparkedSignal.wait(timeout: .now() + .milliseconds(10))
            }
        }
    }

    public var isPaused: Bool { pauseRequested.load(ordering: .acquiring) }

    /// Parks the calling vCPU thread while a pause is requested.
    private func parkIfPaused(_ id: Int) {
        guard pauseRequested.load(ordering: .acquiring) else { return }
        parkedCount.add(1, ordering: .acquiringAndReleasing)
        parkedSignal.signal()
        while pauseRequested.load(ordering: .acquiring) && !stopRequested.load(ordering: .acquiring) {
            _ = resumeSignals[id].wait(timeout: .now() + .milliseconds(100))
        }
        parkedCount.subtract(1, ordering: .acquiringAndReleasing)
        unparkedSignal.signal()
    }

    /// PC platform: the local APICs (their page is per vCPU, so it is not on the bus) and
    /// the application processors waiting for a STARTUP IPI. Set before `run()`.
    package var localAPIC: LocalAPICBank?
    package var startupGate: StartupGate?
    /// The PC platform's devices, whose states a snapshot keeps (nil: not a PC).
    package var pcPlatform: PCPlatformDevices?
    /// PC platform: the PCI bus its virtio-pci devices sit on. Set before `run()`.
    package var pcPCI: PCPlatformPCI?

    /// The vCPU handles (for services that read or set their state while paused).
    package var allVCPUs: [any VCPU] { vcpus }

    /// Where a device sits: its MMIO page, its interrupt and the line that raises it.
    public struct DeviceSlot: Sendable {
        public let index: Int
        public let base: UInt64
        public let size: UInt64
        public let irq: UInt8
        public let interrupt: InterruptLine
    }

    /// Adds an MMIO device in the next free slot of the MMIO window, with its own
    /// interrupt, and lists it in boot info. Call before `run()`.
    @discardableResult
    public func addMMIODevice<D: MMIODevice>(type: BootLayout.DeviceType, _ make: (DeviceSlot) throws -> D) throws -> D {
        try addMMIODevice(type: type, recipe: nil, make)
    }

    /// As `addMMIODevice(type:_:)`, recording how to make the device again (for snapshots).
    func addMMIODevice<D: MMIODevice>(type: BootLayout.DeviceType, recipe: DeviceRecipe?, _ make: (DeviceSlot) throws -> D) throws -> D {
        guard !started.load(ordering: .relaxed) else { throw MachineError.alreadyStarted }
        guard deviceCount < BootLayout.maxDevices else { throw MachineError.tooManyDevices }
        let index = deviceCount
        let base = BootLayout.mmioWindowBase + UInt64(index) * BootLayout.deviceSlotSize
        let irq = UInt8(index + 1)
        let slot = DeviceSlot(index: index, base: base, size: BootLayout.deviceSlotSize, irq: irq,
                              interrupt: interruptLine(irq: irq))
        let device = try make(slot)
        try assemble { builder in try builder.attach(device, base: base, size: slot.size) }
        try BootLayout.writeDevice(BootLayout.DeviceEntry(type: type.rawValue, irq: UInt32(irq), base: base, size: slot.size),
                                   index: index, memory: memory)
        deviceCount += 1
        attachedDevices.append(AttachedDevice(recipe: recipe ?? .unsupported(device.name), transport: device as? VirtioMMIOTransport))
        return device
    }

    /// Lists a device that is not in the MMIO window (a shared page in RAM, say) in boot
    /// info. Call before `run()`.
    public func listDevice(type: BootLayout.DeviceType, base: UInt64, size: UInt64, irq: UInt8 = 0) throws {
        guard deviceCount < BootLayout.maxDevices else { throw MachineError.tooManyDevices }
        try BootLayout.writeDevice(BootLayout.DeviceEntry(type: type.rawValue, irq: UInt32(irq), base: base, size: size),
                                   index: deviceCount, memory: memory)
        deviceCount += 1
    }

    /// A level-style interrupt line whose rising edge delivers vector
    /// `irqVectorBase + irq` to vCPU 0 (the boot CPU handles device interrupts).
    package func interruptLine(irq: UInt8) -> InterruptLine {
        interruptSources += 1
        let level = Atomic<Bool>(false)
        let vector = BootLayout.irqVectorBase &+ irq
        return { [weak self] asserted in
            guard level.exchange(asserted, ordering: .acquiringAndReleasing) != asserted, asserted else { return }
            self?.raiseInterrupt(vector: vector, vcpu: 0)
        }
    }

    /// Counts a device that interrupts by message (MSI-X through the PCI bridge), not by a
    /// line: with one, `hlt` with IF set waits for an interrupt. Call before `run()`.
    public func addMessageSignalledInterruptSource() { interruptSources += 1 }

    /// Injects `vector` into vCPU `id` and wakes it if it waits in `hlt`. Any thread.
    package func raiseInterrupt(vector: UInt8, vcpu id: Int) {
        vcpus[id].injectInterrupt(vector: vector)
        wakeups[id].signal()
    }

    /// The ExtINT request toward vCPU `id` (the 8259's INTR through its LINT0) at `asserted`;
    /// asserting it wakes the vCPU if it waits in `hlt`. Any thread.
    package func setExternalInterruptRequest(_ asserted: Bool, vcpu id: Int) {
        (vcpus[id] as? any ExternalInterruptInput)?.setExternalInterruptRequest(asserted)
        if asserted { wakeups[id].signal() }
    }

    /// The engine's vCPU `id` (for engine-specific tools such as the exit benchmark).
    package func vcpu(_ id: Int) -> any VCPU { vcpus[id] }

    /// The state of vCPU `id` (call after `run` returns, or before it starts).
    public func vcpuState(_ id: Int) throws -> VCPUState { try vcpus[id].getState() }

    /// Runs the guest to completion on one thread per vCPU. `onTick` runs on vCPU 0's thread
    /// at each timer exit when `configuration.tickSeconds` is set (the vCPU is stopped meanwhile).
    public func run(onTick: (@Sendable () -> Void)? = nil) throws -> RunResult {
        guard !started.exchange(true, ordering: .acquiringAndReleasing) else { throw MachineError.alreadyRan }
        let bus = freezeBus()
        if let mode = configuration.confidential, let image, let encrypted = vm as? any EncryptedMemory {
            let m = try ConfidentialLaunch.launch(vm: encrypted, memory: memory, image: image, entry: try vcpus[0].getState(), mode: mode)
            launchMeasurement = m
            onLaunch?(m)
        }
        let count = vcpus.count
        let results = Mutex([(ExitStatistics, [VMExit])](repeating: (ExitStatistics(), []), count: count))
        var timer: DispatchWorkItem?
        if let t = configuration.timeoutSeconds {
            let item = DispatchWorkItem { [weak self] in self?.requestStop(.timeout) }
            DispatchQueue.global().asyncAfter(deadline: .now() + t, execute: item)
            timer = item
        }
        let ruler = HostClock.Ruler()  // the run loops record ticks; converted below
        var tickTimer: DispatchSourceTimer?
        if let period = configuration.tickSeconds {
            if let timer = vcpus[0] as? any PreemptionTimer {
                timer.armPreemptionTimer(instructions: configuration.tickInstructions)
            } else {
                let t = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "swiftvisor.tick"))
                let first = vcpus[0]
                t.schedule(deadline: .now() + period, repeating: period, leeway: .microseconds(50))
                t.setEventHandler { first.requestExit() }
                t.resume()
                tickTimer = t
            }
        }
        doorbells?.start()
        let start = monotonicNanoseconds()
        let threads = vcpus.enumerated().map { id, vcpu in
            HostThread(name: "vcpu\(id)") { [self] in
                VCPUThread.enter(vcpu: id)
                do { try configuration.vcpuThreadSetup?(id) } catch {
                    requestStop(.engineFailure(vcpu: id, failure: .threadSetup("\(error)")))
                }
                let outcome = runLoop(vcpu, bus: bus, onTick: onTick)
                results.withLock { $0[id] = outcome }
            }
        }
        threads.forEach { $0.join() }
        doorbells?.stop()
        let wall = monotonicNanoseconds() - start
        timer?.cancel()
        tickTimer?.cancel()

        let nanosecondsPerTick = ruler.nanosecondsPerTick
        let perVCPU = results.withLock { $0 }.map { stats, trace in
            var scaled = stats
            scaled.scaleTimes(by: nanosecondsPerTick)
            return (scaled, trace)
        }
        var merged = ExitStatistics()
        for (s, _) in perVCPU { merged.merge(s) }
        let reason = stopState.withLock { $0 } ?? .stopped
        return RunResult(stopReason: reason, statistics: merged, perVCPUStatistics: perVCPU.map(\.0),
                         wallNanoseconds: wall, exitTrace: perVCPU.map(\.1))
    }

    /// The vCPU loop: run, dispatch the exit, account for it. Generic so the engine's
    /// concrete vCPU type is used directly (no existential call per exit).
    private func runLoop<V: VCPU>(_ vcpu: V, bus: IOBus, onTick: (@Sendable () -> Void)?) -> (ExitStatistics, [VMExit]) {
        var stats = ExitStatistics()
        var trace: [VMExit] = []
        let record = configuration.recordExits
        var t0 = HostClock.ticks()
        var lastPublished = t0
        let publishInterval = liveExits.publishIntervalTicks
        let preemptionTimer = vcpu as? any PreemptionTimer
        let shadowVCPU = vcpu as? any ShadowPagingVCPU
        defer {
            liveExits.publish(vcpu: vcpu.id, stats)
            finishedCount.add(1, ordering: .acquiringAndReleasing)
            parkedSignal.signal()
        }
        if let gate = startupGate, vcpu.id != 0 {
            // An application processor starts in wait-for-SIPI.
            guard let state = gate.waitForStartup(vcpu: vcpu.id, stopped: { self.stopRequested.load(ordering: .acquiring) }) else {
                return (stats, trace)
            }
            do { try vcpu.setState(state) } catch {
                requestStop(.engineFailure(vcpu: vcpu.id, failure: .threadSetup("startup state: \(error)")))
                return (stats, trace)
            }
            t0 = HostClock.ticks()
        }
        while !stopRequested.load(ordering: .acquiring) {
            parkIfPaused(vcpu.id)
            if t0 &- lastPublished > publishInterval {
                liveExits.publish(vcpu: vcpu.id, stats)
                lastPublished = t0
            }
            let exit: VMExit
            do {
                exit = try vcpu.run()
            } catch {
                requestStop(.engineFailure(vcpu: vcpu.id, failure: .run(error)))
                break
            }
            let t1 = HostClock.ticks()
            // Times are recorded in TSC ticks and scaled to nanoseconds after the run.
            stats.guestNanoseconds &+= t1 &- t0
            if record { trace.append(exit) }
            var done = false
            switch exit {
            case let .portIO(a):
                if a.direction == .write {
                    bus.portWrite(a.port, size: a.size, value: a.value)
                } else {
                    vcpu.completeRead(value: UInt64(bus.portRead(a.port, size: a.size)))
                }
                t0 = HostClock.ticks()
                let ticks = t0 &- t1
                stats.record(.portIO, nanoseconds: ticks)
                stats.recordPort(a.port, nanoseconds: ticks)
                continue
            case let .stringPortIO(port, size, direction, count, data):
                handleStringIO(vcpu, bus: bus, port: port, size: size, direction: direction, count: count, data: data)
                t0 = HostClock.ticks()
                let ticks = t0 &- t1
                stats.record(.portIO, nanoseconds: ticks)
                stats.recordPort(port, nanoseconds: ticks)
                continue
            case let .mmio(a):
                let range: RangeBase?
                if let apic = localAPIC, let offset = apic.mmioOffset(vcpu: vcpu.id, address: a.address) {
                    if a.direction == .write {
                        apic.mmioWrite(vcpu: vcpu.id, offset: offset, size: a.size, value: a.value)
                    } else {
                        vcpu.completeRead(value: apic.mmioRead(vcpu: vcpu.id, offset: offset, size: a.size))
                    }
                    range = LocalAPICBank.base
                } else if a.direction == .write {
                    range = bus.mmioWrite(a.address, size: a.size, value: a.value)
                } else {
                    let r = bus.mmioRead(a.address, size: a.size)
                    vcpu.completeRead(value: r.value)
                    range = r.range
                }
                t0 = HostClock.ticks()
                let ticks = t0 &- t1
                stats.record(.mmio, nanoseconds: ticks)
                stats.recordMMIO(rangeBase: range ?? (a.address & ~0xFFF), nanoseconds: ticks)
                continue
            case let .hypercall(call):
                vcpu.completeHypercall(result: configuration.hypercalls.handle(call, vcpu: vcpu.id))
            case .halt:
                if vcpu.interruptsEnabled && interruptSources > 0 {
                    // Waits for an interrupt, as `hlt` does; the next run() delivers it.
                    // A pause parks the vCPU here and it goes back to waiting after.
                    while !vcpu.hasPendingInterrupt && !stopRequested.load(ordering: .acquiring) {
                        if pauseRequested.load(ordering: .acquiring) { parkIfPaused(vcpu.id); continue }
                        wakeups[vcpu.id].wait()
                    }
                    break
                }
                done = true
                if haltedCount.add(1, ordering: .acquiringAndReleasing).newValue == vcpus.count {
                    requestStop(.allHalted)
                }
            case .shutdown:
                requestStop(.shutdown(vcpu: vcpu.id, state: try? vcpu.getState()))
                done = true
            case let .failEntry(code):
                requestStop(.engineFailure(vcpu: vcpu.id, failure: .entryFailed(hardwareReason: code)))
                done = true
            case let .internalError(suberror, data, bytes):
                requestStop(.engineFailure(vcpu: vcpu.id, failure: .internalError(suberror: suberror, data: data, instructionBytes: bytes,
                                                                                 rip: (try? vcpu.getState())?.rip)))
                done = true
            case .interrupted, .preemptionTimer:
                if vcpu.id == 0, configuration.tickSeconds != nil, let tick = onTick {
                    tickCount.add(1, ordering: .relaxed)
                    tick()
                    if case .preemptionTimer = exit, let preemptionTimer {
                        preemptionTimer.armPreemptionTimer(instructions: configuration.tickInstructions)
                    }
                }
            case let .exception(vector, code):
                requestStop(.engineFailure(vcpu: vcpu.id, failure: .unhandledException(vector: vector, errorCode: code)))
                done = true
            case let .memoryFault(gpa, access):
                if let handler = memoryFaultHandler.function, handler(gpa, access) { break }
                requestStop(.engineFailure(vcpu: vcpu.id, failure: .unhandledMemoryFault(gpa: gpa, access: access)))
                done = true
            case let .shadowPaging(event):
                guard let pager = shadowPager, let shadowVCPU else {
                    requestStop(.engineFailure(vcpu: vcpu.id, failure: .shadowPagingExitOutsideShadowMode))
                    done = true
                    break
                }
                if case let .secondLevelViolation(gpa, access) = pager.handle(event, vcpu: shadowVCPU) {
                    if let handler = memoryFaultHandler.function, handler(gpa, access) { break }
                    requestStop(.engineFailure(vcpu: vcpu.id, failure: .unhandledMemoryFault(gpa: gpa, access: access)))
                    done = true
                }
            case let .systemEvent(type):
                requestStop(.engineFailure(vcpu: vcpu.id, failure: .systemEvent(type: type)))
                done = true
            case let .unknown(reason):
                requestStop(.engineFailure(vcpu: vcpu.id, failure: .unknownExit(reason: reason)))
                done = true
            }
            t0 = HostClock.ticks()
            stats.record(exit.reason, nanoseconds: t0 &- t1)
            if done { break }
        }
        return (stats, trace)
    }

    private func handleStringIO<V: VCPU>(_ vcpu: V, bus: IOBus, port: UInt16, size: UInt8, direction: AccessDirection, count: UInt32, data: [UInt8]) {
        let n = Int(size)
        if direction == .write {
            for i in 0..<Int(count) {
                var v: UInt32 = 0
                for b in 0..<n { v |= UInt32(data[i * n + b]) << (8 * UInt32(b)) }
                bus.portWrite(port, size: size, value: v)
            }
        } else {
            var bytes: [UInt8] = []
            bytes.reserveCapacity(Int(count) * n)
            for _ in 0..<Int(count) {
                let v = bus.portRead(port, size: size)
                for b in 0..<n { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(b)))) }
            }
            vcpu.completeStringRead(bytes)
        }
    }
}
