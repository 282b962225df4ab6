import CHost
import Devices
import FoundationEssentials
import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// What taking a snapshot cost.
public struct SnapshotReport: Sendable, Codable {
    public var path: String
    /// The vCPUs were stopped for this long: state saved and write protection armed.
    public var pauseSeconds: Double
    /// From the pause to the file renamed into place (the guest ran meanwhile).
    public var totalSeconds: Double
    /// Guest writes that hit a protected page, and the bytes those faults copied.
    public var copyOnWriteFaults: UInt64
    public var bytesCopied: UInt64
    public var fileBytes: UInt64
    public var mechanism: String
}

public enum MachineSnapshotError: Error, CustomStringConvertible {
    case devicesNotSupported([String])
    case badDeviceState(String)
    /// The machine has ended: there is no running guest left to snapshot.
    case ended(StopReason)
    case engineMismatch(snapshot: String, requested: String)
    /// The machine is in a state its devices cannot save (the reason says which and why).
    case notSavableNow(String)

    public var description: String {
        switch self {
        case let .devicesNotSupported(names):
            return "this machine has devices a snapshot cannot carry yet: \(names.joined(separator: ", ")) (virtio block, net, console and balloon are supported)"
        case let .badDeviceState(message):
            return "the snapshot's device state cannot be restored: \(message)"
        case let .ended(reason):
            return "the VM has already ended (\(reason.summary)): only a running VM can be snapshotted"
        case let .engineMismatch(snapshot, requested):
            return "the snapshot was taken on the \(snapshot) engine and restores only there (asked for \(requested)): the hypercall ABI in its RAM differs"
        case let .notSavableNow(reason):
            return "the VM cannot be saved now: \(reason)"
        }
    }
}

extension Machine {
    /// Snapshots the running machine with copy-on-write: the vCPUs stop only while their
    /// state is saved and guest RAM is write-protected; then the guest runs on while the
    /// pages are written out in order, and a page the guest writes first is copied just
    /// before the write (KVM: userfaultfd write protection; software engine: its
    /// second-level page table). The file appears atomically at `path`.
    /// `whilePaused` runs at the snapshot point, with every vCPU stopped.
    public func snapshot(to path: String, note: String = "", progress: ((Int) -> Void)? = nil,
                         whilePaused: (() -> Void)? = nil) throws -> SnapshotReport {
        if let reason = endReason { throw MachineSnapshotError.ended(reason) }
        try checkDevicesSavable()
        let t0 = monotonicNanoseconds()
        pause()
        // Devices stop touching memory too (freezing waits for work in progress), so memory
        // and device state belong to one point.
        let transports = freezableTransports
        for t in transports { t.freeze() }
        var resumed = false
        defer {
            if !resumed {
                for t in transports { t.thaw() }
                resume()
            }
        }
        // The guest may have ended while the vCPUs were being stopped.
        if let reason = endReason { throw MachineSnapshotError.ended(reason) }
        let states = try allVCPUs.map { try $0.getState() }
        let session = CopyOnWriteSession(memory: memory)
        let protection: any WriteProtection
        // The second-level table sees vCPU writes only; with devices that write guest
        // memory (DMA), the host mapping is protected instead, which catches both.
        if let table = vm as? any SecondLevelTranslation, transports.isEmpty {
            protection = SecondLevelWriteProtection(table: table)
            memoryFaultHandler.set { gpa, access in
                guard access.contains(.write) else { return false }
                session.firstWrite(page: Int(gpa >> 12))
                return true
            }
        } else {
            protection = try UserfaultWriteProtection(memory: memory) { page in session.firstWrite(page: page) }
        }
        session.protection = protection
        defer {
            protection.finish()
            memoryFaultHandler.set(nil)
        }
        try protection.protectAll()
        whilePaused?()
        let metadata = SnapshotMetadata(engine: engine.name, memorySize: memory.size, vcpuCount: allVCPUs.count,
                                        commandLine: configuration.commandLine, imageIdentity: configuration.guestName,
                                        created: Date(), note: note)
        let devices = try savedDeviceStates()
        let t1 = monotonicNanoseconds()
        for t in transports { t.thaw() }
        resume()
        resumed = true
        let written = try SnapshotWriter.writeChunks(to: path, metadata: metadata, vcpus: states, devices: devices,
                                                     pageCount: Int(memory.size / 4096), progress: progress) { pages, buffer in
            session.contents(pages: pages, into: buffer)
        }
        let t2 = monotonicNanoseconds()
        return SnapshotReport(path: path, pauseSeconds: Double(t1 - t0) / 1e9, totalSeconds: Double(t2 - t0) / 1e9,
                              copyOnWriteFaults: session.faults, bytesCopied: session.bytesCopied,
                              fileBytes: written.bytesWritten, mechanism: protection.mechanism)
    }

    /// Throws when a device cannot be saved (snapshots and migration carry only these).
    func checkDevicesSavable() throws {
        // The memory key of a confidential VM never leaves its engine, so no stream could be restored.
        if configuration.confidential != nil {
            throw ConfidentialError("a confidential VM cannot be snapshotted or migrated: its memory key never leaves the engine that launched it")
        }
        let unsupported = attachedDevices.compactMap { d -> String? in if case let .unsupported(n) = d.recipe { return n } else { return nil } }
        guard unsupported.isEmpty else { throw MachineSnapshotError.devicesNotSupported(unsupported) }
        if let reason = pcPlatform?.unsavableReason { throw MachineSnapshotError.notSavableNow(reason) }
    }

    /// The device records of a snapshot (and of a migration stream): COM1, the device list,
    /// then each virtio transport and its device. Call with the vCPUs paused and the
    /// transports frozen.
    func savedDeviceStates() throws -> [(name: String, state: [UInt8])] {
        var devices: [(name: String, state: [UInt8])] = [("com1", uart.savedState)]
        let encoder = JSONEncoder()
        devices.append(("devices", Array(try encoder.encode(attachedDevices.map(\.recipe)))))
        if let pc = pcPlatform { devices.append((PCPlatformDevices.recordName, Array(try encoder.encode(pc.savedState)))) }
        devices += try pciDeviceRecords()
        for (i, d) in attachedDevices.enumerated() {
            guard let t = d.transport else { continue }
            devices.append(("virtio\(i)", Array(try encoder.encode(t.savedState))))
            devices.append(("virtio\(i).device", t.device.savedDeviceState()))
        }
        return devices
    }

    /// Builds a machine from a snapshot file: the same RAM, vCPU states and serial-port
    /// state; it continues where the snapshot was taken when `run()` is called. With
    /// `lazy`, RAM is filled on first touch through userfaultfd (each 64 KiB chunk
    /// verified when first read), so the guest starts before all of RAM is read; otherwise
    /// all of RAM is read and verified first. The file is only read.
    public convenience init(restoring snapshot: SnapshotFile, engine: any Engine, lazy: Bool = false,
                            timeoutSeconds: Double? = nil, serialOutput: @escaping @Sendable (UInt8) -> Void) throws {
        let m = snapshot.metadata
        guard m.engine == engine.name else { throw MachineSnapshotError.engineMismatch(snapshot: m.engine, requested: engine.name) }
        var config = MachineConfiguration(memorySize: m.memorySize, vcpuCount: m.vcpuCount, commandLine: m.commandLine,
                                          timeoutSeconds: timeoutSeconds, guestName: m.imageIdentity)
        // A PC's isa-debug-exit sits where the plain machine's exit port is, with QEMU's encoding.
        config.debugExitEncoding = snapshot.devices.contains { $0.name == PCPlatformDevices.recordName }
        var loader: LazyMemoryLoader?
        try self.init(configuration: config, engine: engine, serialOutput: serialOutput) { memory in
            if lazy {
                loader = try LazyMemoryLoader(snapshot: snapshot, memory: memory)
            } else {
                try snapshot.restoreMemory(into: memory.base, size: memory.size, baseIsZero: true)
            }
            return snapshot.vcpus
        }
        lazyLoader = loader
        // RAM the snapshot cannot supply stops the VM with the reason, never runs on as zeros.
        loader?.counters.onFailure.set({ [weak self] page, reason in self?.requestStop(.engineFailure(vcpu: 0, failure: .lazyRestore(page: page, reason: reason))) })
        try restoreDevices(from: snapshot.devices, console: serialOutput)
    }

    /// Rebuilds the PC platform a snapshot was taken on and gives its devices their states.
    private func restorePCPlatform(from record: [UInt8]) throws {
        let saved: PCPlatformDevices.SavedState
        do { saved = try JSONDecoder().decode(PCPlatformDevices.SavedState.self, from: Data(record)) } catch {
            throw MachineSnapshotError.badDeviceState("PC platform: \(error)")
        }
        guard pcPlatform == nil else { throw MachineSnapshotError.badDeviceState("PC platform restored twice") }
        // KVM's PV send-IPI hypercall is not offered again: the configuration's hypercall table
        // is fixed before the platform exists (only kvm-unit-tests' apic test calls it).
        let devices = try PCPlatform.install(on: self, linux: saved.linux, cpu: saved.cpu, hypercallTarget: nil)
        let counters = try allVCPUs.map { try $0.getState().msrs[MSR.tsc] ?? 0 }
        do { try devices.restore(saved, timeStampCounters: counters) } catch {
            throw MachineSnapshotError.badDeviceState(error.description)
        }
        // Every application processor was running (or the snapshot was refused): each goes
        // on from its restored state instead of waiting for STARTUP.
        startupGate = nil
    }

    /// Gives COM1 its saved state and rebuilds the saved devices in their slots with theirs
    /// (records as `savedDeviceStates()` makes them).
    func restoreDevices(from records: [(name: String, state: [UInt8])], console: @escaping @Sendable (UInt8) -> Void) throws {
        if let com1 = records.first(where: { $0.name == "com1" }) { uart.restore(state: com1.state) }
        if let record = records.first(where: { $0.name == PCPlatformDevices.recordName }) {
            try restorePCPlatform(from: record.state)
        }
        try restorePCIDevices(from: records, console: console)
        guard let manifest = records.first(where: { $0.name == "devices" }) else { return }
        let decoder = JSONDecoder()
        let recipes: [DeviceRecipe]
        do { recipes = try decoder.decode([DeviceRecipe].self, from: Data(manifest.state)) } catch {
            throw MachineSnapshotError.badDeviceState("device list: \(error)")
        }
        for (i, recipe) in recipes.enumerated() {
            switch recipe {
            case let .virtioBlock(path, readOnly): try addVirtioBlock(path: path, readOnly: readOnly)
            case let .virtioNet(attachment, mac):
                guard let a = NetworkAttachment(attachment), let address = MACAddress(mac) else {
                    throw MachineSnapshotError.badDeviceState("network attachment \(attachment) / \(mac)")
                }
                try addVirtioNet(attachment: a, mac: address)
            case .virtioConsole: try addVirtioConsole { bytes in bytes.forEach(console) }
            case .virtioBalloon: try addVirtioBalloon()
            case let .unsupported(name): throw MachineSnapshotError.badDeviceState("device \(name) cannot be restored")
            }
            guard let transport = attachedDevices.last?.transport, attachedDevices.count == i + 1 else {
                throw MachineSnapshotError.badDeviceState("device \(i) went into the wrong slot")
            }
            guard let saved = records.first(where: { $0.name == "virtio\(i)" }) else {
                throw MachineSnapshotError.badDeviceState("no state for device \(i)")
            }
            do {
                try transport.device.restoreDeviceState(records.first { $0.name == "virtio\(i).device" }?.state ?? [])
                try transport.restore(try decoder.decode(VirtioMMIOTransport.SavedState.self, from: Data(saved.state)))
            } catch let e as MachineSnapshotError {
                throw e
            } catch {
                throw MachineSnapshotError.badDeviceState("device \(i): \(error)")
            }
        }
    }
}

/// Lazy restore: guest RAM registered with userfaultfd in missing-page mode; the first
/// touch of a page (by a vCPU through KVM, by the interpreter, or by a device) faults, and
/// a handler thread copies the page in from the snapshot file. The file is read and
/// verified a 64 KiB chunk at a time anyway, so the first fault in a chunk also places the
/// non-zero pages of its group of chunks (after waking the faulting thread with its own
/// page): code and data a guest uses together lie together, and each fault saved is a round
/// trip through this thread (two context switches) the guest would otherwise wait for.
/// Zero pages are left to fault, so RAM the guest never touches is still not allocated.
// SAFETY: the fault thread is started and joined by the owner; shared counters are atomic and the failure hook is behind a Mutex.
final class LazyMemoryLoader: @unchecked Sendable {
    private let uffd: Int32
    private let stopFD: Int32
    private var thread: HostThread?
    private let memory: GuestMemory
    final class Counters: Sendable {
        /// Faults served (each a guest access that waited for the handler).
        let faults = Atomic<UInt64>(0)
        /// Pages placed: the faulting ones and their chunks' other non-zero pages.
        let pagesLoaded = Atomic<UInt64>(0)
        /// Told when the file cannot supply a page (a corrupt chunk): the page is filled with
        /// zeros only so the faulting thread can go on to be stopped.
        let onFailure = LockedFunction<@Sendable (_ page: Int, _ reason: String) -> Void>()
    }
    let counters = Counters()

    init(snapshot: SnapshotFile, memory: GuestMemory) throws {
        guard snapshot.metadata.memorySize == memory.size else {
            throw SnapshotError.memorySizeMismatch(snapshot: snapshot.metadata.memorySize, machine: memory.size)
        }
        self.memory = memory
        let fd = host_uffd_open(0)
        guard fd >= 0 else { throw CopyOnWriteError.userfaultfdUnavailable(errno: -fd) }
        let rc = host_uffd_register(fd, memory.base, memory.size, 0, 1)
        guard rc == 0 else { close(fd); throw CopyOnWriteError.userfaultfdUnavailable(errno: -rc) }
        uffd = fd
        stopFD = host_eventfd()
        let base = UInt(bitPattern: memory.base)
        let pages = Int(memory.size / 4096)
        thread = HostThread(name: "lazy-restore") { [uffd, stopFD, counters] in
            let page = SnapshotFormat.pageSize, perChunk = SnapshotFormat.pagesPerChunk
            let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: SnapshotFormat.chunkSize, alignment: page)
            defer { chunk.deallocate() }
            var chunkPlaced = [Bool](repeating: false, count: snapshot.chunkCount)
            var address: UInt64 = 0
            var isWrite: Int32 = 0, isWP: Int32 = 0
            func place(_ p: Int, from source: UnsafeRawPointer) {
                _ = host_uffd_copy(uffd, UnsafeMutableRawPointer(bitPattern: base + UInt(p) * UInt(page)), source, UInt64(page))
                counters.pagesLoaded.add(1, ordering: .relaxed)
            }
            /// The chunk in `chunk` (read and verified): its non-zero pages but `skipping`.
            func placeNonZeroPages(of c: Int, length: Int, skipping: Int?) {
                chunkPlaced[c] = true
                let first = c * perChunk
                for p in first..<(first + length / page) where p != skipping {
                    let source = UnsafeRawBufferPointer(rebasing: chunk[(p - first) * page ..< (p - first + 1) * page])
                    if !Self.isZero(source) { place(p, from: source.baseAddress!) }
                }
            }
            while true {
                let r = host_uffd_next_fault(uffd, stopFD, -1, &address, &isWrite, &isWP)
                if r != 1 { return }
                let faulting = Int((UInt(address) - base) >> 12)
                guard faulting >= 0, faulting < pages else { continue }
                counters.faults.add(1, ordering: .relaxed)
                let c = faulting / perChunk
                if chunkPlaced[c] {
                    // A zero page left to fault, or one the guest gave back: just this page.
                    do { try snapshot.readPage(faulting, into: chunk) } catch {
                        chunk.initializeMemory(as: UInt8.self, repeating: 0)
                        counters.onFailure.function?(faulting, "\(error)")
                    }
                    place(faulting, from: chunk.baseAddress!)
                    continue
                }
                let length: Int
                do { length = try snapshot.readChunk(c, into: chunk) } catch {
                    chunk.initializeMemory(as: UInt8.self, repeating: 0)
                    counters.onFailure.function?(faulting, "\(error)")
                    place(faulting, from: chunk.baseAddress!)
                    continue
                }
                place(faulting, from: chunk.baseAddress! + (faulting - c * perChunk) * page)
                // Then the rest of the chunk, and the other chunks of its group (one that
                // fails its checksum is left to report itself when the guest touches it).
                placeNonZeroPages(of: c, length: length, skipping: faulting)
                let group = c - c % Self.chunksPerGroup
                for other in group..<min(group + Self.chunksPerGroup, chunkPlaced.count) where !chunkPlaced[other] {
                    guard let n = try? snapshot.readChunk(other, into: chunk) else { continue }
                    placeNonZeroPages(of: other, length: n, skipping: nil)
                }
            }
        }
    }

    /// Chunks placed together on the first fault in any of them (256 KiB: code and data a
    /// guest uses together mostly lie within that of each other).
    static let chunksPerGroup = 4

    private static func isZero(_ page: UnsafeRawBufferPointer) -> Bool {
        var any: UInt64 = 0
        for k in stride(from: 0, to: page.count, by: 8) { any |= page.load(fromByteOffset: k, as: UInt64.self) }
        return any == 0
    }

    deinit {
        _ = host_eventfd_signal(stopFD)
        thread?.join()
        _ = host_uffd_unregister(uffd, memory.base, memory.size)
        close(uffd)
        close(stopFD)
    }
}
