import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import VirtCore

/// How a destination takes incoming machines.
public struct IncomingMigrationOptions: Sendable {
    /// The engine the arriving machine runs on (any: migration crosses engines).
    public var engine: any Engine
    /// The most guest RAM this destination holds (nil: up to `BootLayout.maxRAM`).
    public var memoryLimit: UInt64?
    /// When set, only a machine running this guest is accepted.
    public var expectedGuest: String?
    /// A source silent for this long fails the attempt.
    public var timeoutSeconds: Double = 10
    /// The arriving machine's own run-time limit (`MachineConfiguration.timeoutSeconds`).
    public var machineTimeoutSeconds: Double?
    /// How long a post-copy machine whose stream broke after the switch-over waits for its
    /// source to resume it (`migrate --resume`) at this address; 0: its guest stops at once.
    public var postcopyRecoverySeconds: Double = 300
    /// RAM to allocate while waiting for the source (QEMU's `-mem-prealloc`): a pre-copy
    /// source offering exactly this size then streams into pages that exist, instead of
    /// paying the host's page allocation (a fault and a zeroed page each) on the way. The
    /// first pre-copy attempt of that size uses it; post-copy starts from fresh RAM, since
    /// its missing pages must be missing for userfaultfd. nil: none.
    public var preallocateBytes: UInt64?

    public init(engine: any Engine, memoryLimit: UInt64? = nil, expectedGuest: String? = nil) {
        self.engine = engine; self.memoryLimit = memoryLimit; self.expectedGuest = expectedGuest
    }
}

/// What arrived.
public struct IncomingMigrationReport: Sendable, Codable, Equatable {
    public var sourceEngine: String
    public var engine: String
    public var memorySize: UInt64
    public var pagesReceived: UInt64
    public var bytesReceived: UInt64
    public var rounds: Int
    /// Whether the pages arrived in RAM preallocated before the source connected.
    public var intoPreallocatedMemory: Bool
}

/// RAM a destination allocates in the background while it waits for a source, handed to
/// the first session: a pre-copy offer of the same size takes it; any other first session
/// lets it go, so it never holds host memory for nothing.
private final class PreparedMemory: Sendable {
    /// `failed`: no RAM could be prepared; the migration then allocates as it goes.
    private enum State { case allocating, ready(GuestMemory), failed, released }
    private let state = Mutex<State>(.allocating)
    private let done = DispatchSemaphore(value: 0)

    init(bytes: UInt64) {
        HostThread(name: "migration-prealloc") { [self] in
            let outcome: State
            do throws(GuestMemoryError) {
                let memory = try GuestMemory(size: bytes, name: "swiftvisor-incoming-ram")
                try memory.preallocate()
                outcome = .ready(memory)
            } catch {
                outcome = .failed
            }
            state.withLock { if case .allocating = $0 { $0 = outcome } }
            done.signal()
        }.detach()
    }

    /// The RAM, once allocated, when it has `bytes`; nil otherwise. Either way it is released:
    /// a later session (after a failed attempt wrote into it) allocates as it goes.
    func take(bytes: UInt64) -> GuestMemory? {
        done.wait()
        done.signal()  // every later caller passes at once
        return state.withLock { s in
            defer { s = .released }
            if case let .ready(memory) = s, memory.size == bytes { return memory }
            return nil
        }
    }

    /// Lets the RAM go without waiting for the allocation (a post-copy session).
    func release() { state.withLock { $0 = .released } }
}

/// A destination: listens at an address and builds the machine a source sends. One
/// migration at a time: a second source that connects meanwhile is refused as busy, and so
/// is every source once a machine has arrived. A failed attempt (cut connection, corrupt
/// stream) leaves nothing behind, and `receive` waits for the next one.
public final class IncomingMigration: @unchecked Sendable {
    // SAFETY: the listening socket, options and queue are immutable or synchronised
    // (sessions and flags behind a Mutex/Atomic).
    public let options: IncomingMigrationOptions
    private let socket: MigrationListeningSocket
    private let sessions = Mutex<[MigrationConnection]>([])
    private let sessionReady = DispatchSemaphore(value: 0)
    /// A session is in progress or a machine has arrived: further sources are refused.
    private let busy = Atomic<Bool>(false)
    private let arrived = Atomic<Bool>(false)
    private var acceptThread: HostThread?
    /// A post-copy machine that arrived here waits for its source to reconnect.
    private let resumeWanted = Atomic<Bool>(false)
    private let resumeConnection = Mutex<MigrationConnection?>(nil)
    private let resumeReady = DispatchSemaphore(value: 0)
    private let preparedMemory: PreparedMemory?

    /// The address sources connect to (with the port chosen when 0 was asked for).
    public var address: MigrationAddress { socket.address }

    public init(listeningOn address: MigrationAddress, options: IncomingMigrationOptions) throws(MigrationError) {
        self.options = options
        preparedMemory = options.preallocateBytes.map { PreparedMemory(bytes: $0) }
        socket = try MigrationListeningSocket(address: address)
        acceptThread = HostThread(name: "migration-accept") { [self] in acceptLoop() }
    }

    deinit { close() }

    /// Stops listening; a `receive` waiting for a source throws.
    public func close() {
        socket.close()
        sessionReady.signal()
        resumeReady.signal()
        acceptThread?.join()
        acceptThread = nil
    }

    private func acceptLoop() {
        while let connection = socket.accept(timeoutSeconds: options.timeoutSeconds) {
            if busy.exchange(true, ordering: .acquiringAndReleasing) {
                if arrived.load(ordering: .acquiring) {
                    // Perhaps a source resuming a broken post-copy stream: the machine here may
                    // take a moment to notice the break, so the connection waits for it a little.
                    let engine = options.engine.name
                    DispatchQueue.global().async { [self] in
                        for _ in 0..<Self.resumeGraceMilliseconds {
                            if resumeWanted.exchange(false, ordering: .acquiringAndReleasing) {
                                resumeConnection.withLock { $0 = connection }
                                resumeReady.signal()
                                return
                            }
                            usleep(1000)
                        }
                        Self.refuse(connection, .busy, "a migrated machine already runs here", engine: engine)
                    }
                    continue
                }
                let reason = arrived.load(ordering: .acquiring) ? "a migrated machine already runs here" : "another migration is arriving"
                let engine = options.engine.name
                DispatchQueue.global().async { Self.refuse(connection, .busy, reason, engine: engine) }
                continue
            }
            sessions.withLock { $0.append(connection) }
            sessionReady.signal()
        }
    }

    /// How long a connection to a destination whose machine has arrived waits for that
    /// machine to ask for its source back before it is refused as busy.
    static let resumeGraceMilliseconds = 3000

    /// The next connection after the machine that arrived here asked for its source back,
    /// or nil when none comes within `seconds` or the listener closes.
    func awaitResumeConnection(seconds: Double) -> MigrationConnection? {
        resumeWanted.store(true, ordering: .releasing)
        defer { resumeWanted.store(false, ordering: .releasing) }
        guard resumeReady.wait(timeout: .now() + seconds) == .success else { return nil }
        return resumeConnection.withLock { c in
            defer { c = nil }
            return c
        }
    }

    /// Answers a source's offer with a refusal (reading the offer first, so the answer is
    /// not lost to a reset).
    private static func refuse(_ connection: MigrationConnection, _ reason: MigrationRejection, _ message: String, engine: String) {
        let channel = MigrationChannel(connection: connection)
        try? channel.sendPreamble()
        guard (try? channel.receivePreamble()) != nil, (try? channel.receive(.offer)) != nil else { return }
        try? channel.sendJSON(.accept, MigrationAnswer(accepted: false, engine: engine, reason: reason, message: message))
    }

    /// Waits for sources until one migration succeeds; returns the machine, ready to `run()`.
    /// Each failed attempt is passed to `onFailedAttempt` and the wait goes on.
    public func receive(serialOutput: @escaping @Sendable (UInt8) -> Void,
                        onFailedAttempt: ((MigrationError) -> Void)? = nil) throws -> (Machine, IncomingMigrationReport) {
        while true {
            do {
                return try receiveOne(serialOutput: serialOutput)
            } catch let error as MigrationError {
                if error == .listenerClosed { throw error }
                onFailedAttempt?(error)
            }
        }
    }

    /// Takes one attempt: the machine on success, the attempt's error otherwise. With
    /// `waitSeconds`, no source within that time is `.timedOut` (else it waits as long as it takes).
    public func receiveOne(serialOutput: @escaping @Sendable (UInt8) -> Void,
                           waitSeconds: Double? = nil) throws -> (Machine, IncomingMigrationReport) {
        let connection: MigrationConnection
        while true {
            if let waitSeconds {
                guard sessionReady.wait(timeout: .now() + waitSeconds) == .success else {
                    throw MigrationError.timedOut(expecting: "a source to connect")
                }
            } else {
                sessionReady.wait()
            }
            if let c = sessions.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) { connection = c; break }
            throw MigrationError.listenerClosed
        }
        do {
            let result = try session(MigrationChannel(connection: connection), serialOutput: serialOutput)
            arrived.store(true, ordering: .releasing)
            return result
        } catch {
            busy.store(false, ordering: .releasing)
            throw error
        }
    }

    private func session(_ channel: MigrationChannel, serialOutput: @escaping @Sendable (UInt8) -> Void) throws -> (Machine, IncomingMigrationReport) {
        do {
            try channel.sendPreamble()
            try channel.receivePreamble()
            let offer = try channel.receiveJSON(.offer, as: MigrationOffer.self)
            if let refusal = check(offer) {
                try channel.sendJSON(.accept, MigrationAnswer(accepted: false, engine: options.engine.name, reason: refusal.0, message: refusal.1))
                throw MigrationError.rejected(refusal.0, message: refusal.1)
            }
            try channel.sendJSON(.accept, MigrationAnswer(accepted: true, engine: options.engine.name, reason: nil, message: ""))

            var config = MachineConfiguration(memorySize: offer.memorySize, vcpuCount: offer.vcpuCount,
                                              commandLine: offer.commandLine, timeoutSeconds: options.machineTimeoutSeconds,
                                              guestName: offer.guestName)
            config.ioeventfd = true
            var records: [(name: String, state: [UInt8])] = []
            var postcopy: PostcopyReceiver?
            var pages: UInt64 = 0
            var rounds = 0
            let machine: Machine
            let prepared: GuestMemory?
            if offer.postcopy { preparedMemory?.release(); prepared = nil } else { prepared = preparedMemory?.take(bytes: offer.memorySize) }
            do {
                machine = try Machine(configuration: config, engine: options.engine, preparedMemory: prepared,
                                      serialOutput: serialOutput) { memory in
                    var states: [VCPUState]?
                    var written = DirtyBitmap(pageCount: Int(memory.size) / MigrationFormat.pageSize)
                    while true {
                        let frame = try channel.receive(expecting: "the machine's pages and state")
                        switch frame.kind {
                        case .pages:
                            guard states == nil || offer.postcopy else { throw MigrationError.unexpectedFrame(got: "pages", expecting: "devices") }
                            if offer.postcopy {
                                // Pages sent before the switch are placed (zero pages too): userfaultfd
                                // will treat every page not placed as missing.
                                pages += UInt64(try MigrationPageCodec.forEachPage(frame.payload, pageCount: written.pageCount) { page, data in
                                    let target = memory.base + page * MigrationFormat.pageSize
                                    if let data { target.copyMemory(from: data, byteCount: MigrationFormat.pageSize) } else { memset(target, 0, MigrationFormat.pageSize) }
                                    written[page] = true
                                })
                            } else {
                                pages += UInt64(try MigrationPageCodec.decode(frame.payload, into: memory, written: &written,
                                                                                   preallocated: prepared != nil))
                            }
                        case .roundEnd:
                            rounds += 1
                            var ack = SnapshotByteWriter()
                            ack.u64(channel.bytesReceived)
                            try channel.send(.roundAcknowledged, ack.bytes)
                        case .vcpus:
                            do { states = try SnapshotVCPUCodec.decode(Array(frame.payload)) } catch {
                                throw MigrationError.corruptFrame("vcpus frame: \(error)")
                            }
                        case .devices:
                            guard states != nil else { throw MigrationError.unexpectedFrame(got: "devices", expecting: "vcpus") }
                            do { records = try SnapshotDeviceCodec.decode(Array(frame.payload)) } catch {
                                throw MigrationError.corruptFrame("devices frame: \(error)")
                            }
                        case .postcopyStart:
                            var r = SnapshotByteReader(Array(frame.payload), section: "post-copy start")
                            guard offer.postcopy, let count = try? r.u64(), count == UInt64(written.pageCount),
                                  let states, states.count == offer.vcpuCount else {
                                throw MigrationError.unexpectedFrame(got: "post-copy start", expecting: "pages")
                            }
                            var words: [UInt64] = []
                            for _ in 0..<(written.pageCount + 63) / 64 {
                                guard let w = try? r.u64() else { throw MigrationError.corruptFrame("post-copy start: page bitmap is short") }
                                words.append(w)
                            }
                            guard r.remaining == 0 else { throw MigrationError.corruptFrame("post-copy start: trailing bytes") }
                            let remote = DirtyBitmap(pageCount: written.pageCount, words: words)
                            guard !remote.dirtyPages.contains(where: { written[$0] }), remote.words.last.map({ written.pageCount % 64 == 0 || $0 >> UInt64(written.pageCount % 64) == 0 }) ?? true else {
                                throw MigrationError.corruptFrame("post-copy start: page bitmap names pages already sent or outside RAM")
                            }
                            // Demanded pages should not queue behind much pushed data.
                            var small: Int32 = 256 << 10
                            setsockopt(channel.connection.fd, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
                            postcopy = try PostcopyReceiver(channel: channel, memory: memory, remote: remote)
                            pages = UInt64(written.dirtyCount)
                            return states
                        case .complete:
                            var r = SnapshotByteReader(Array(frame.payload), section: "complete")
                            guard let sent = try? r.u64(), r.remaining == 0 else { throw MigrationError.corruptFrame("complete frame") }
                            guard sent == pages else {
                                throw MigrationError.corruptFrame("the source sent \(sent) pages but \(pages) arrived")
                            }
                            guard let states, states.count == offer.vcpuCount else {
                                throw MigrationError.unexpectedFrame(got: "complete", expecting: "vcpus")
                            }
                            return states
                        default:
                            throw MigrationError.unexpectedFrame(got: frame.kind.description, expecting: "pages, vcpus, devices or complete")
                        }
                    }
                }
            } catch let error as MigrationError {
                throw error
            } catch {
                throw MigrationError.restoreFailed("\(error)")
            }
            if let postcopy {
                machine.postcopyReceiver = postcopy
                postcopy.recoverySeconds = options.postcopyRecoverySeconds
                postcopy.engineName = options.engine.name
                postcopy.awaitResume = { [weak self] seconds in self?.awaitResumeConnection(seconds: seconds) }
                postcopy.onFailure.set({ [weak machine] reason in machine?.requestStop(.engineFailure(vcpu: 0, failure: .postcopy(reason))) })
                postcopy.start()
            }
            do {
                try machine.restoreDevices(from: records, console: serialOutput)
                // The guest runtime reads the hypercall mechanism from boot info at each call,
                // so a machine that crossed engines uses this engine's from now on.
                // (A PC platform guest has no boot info: that page is its own.)
                if machine.pcPlatform == nil { try BootLayout.setHypercallMechanism(options.engine.hypercallMechanism, in: machine.memory) }
                machine.vm.noteHostWrite(gpa: 0, length: machine.memory.size)
            } catch {
                throw MigrationError.restoreFailed("\(error)")
            }
            if let postcopy { try postcopy.send(.confirm, []) } else { try channel.send(.confirm, []) }
            let report = IncomingMigrationReport(sourceEngine: offer.sourceEngine, engine: options.engine.name,
                                                 memorySize: offer.memorySize, pagesReceived: pages,
                                                 bytesReceived: channel.bytesReceived, rounds: rounds,
                                                 intoPreallocatedMemory: prepared != nil)
            return (machine, report)
        } catch let error as MigrationError {
            switch error {
            case .rejected, .peerFailed, .connectionClosed: break
            default: channel.sendFailure(error.description)
            }
            throw error
        }
    }

    /// Why the offer cannot be taken here, if it cannot.
    private func check(_ offer: MigrationOffer) -> (MigrationRejection, String)? {
        if offer.resume == true {
            return (.incompatible, "no interrupted post-copy migration waits here to be resumed")
        }
        let limit = min(options.memoryLimit ?? BootLayout.maxRAM, BootLayout.maxRAM)
        if offer.memorySize > limit {
            return (.memoryTooSmall, "the machine has \(MemorySize.format(offer.memorySize)) of RAM; this destination holds at most \(MemorySize.format(limit))")
        }
        if offer.vcpuCount < 1 || offer.vcpuCount > BootLayout.maxVCPUs {
            return (.incompatible, "\(offer.vcpuCount) vCPUs is outside 1–\(BootLayout.maxVCPUs)")
        }
        if let expected = options.expectedGuest, expected != offer.guestName {
            return (.incompatible, "this destination waits for guest '\(expected)', not '\(offer.guestName)'")
        }
        return nil
    }
}

extension BootLayout {
    /// Rewrites boot info's hypercall fields (a machine that moved to another engine).
    static func setHypercallMechanism(_ mechanism: HypercallMechanism, in memory: GuestMemory) throws {
        try memory.store(mechanism.bootInfoKind, at: bootInfoAddress + 20)
        if case let .portDoorbell(port) = mechanism {
            try memory.store(port, at: bootInfoAddress + 24)
        } else {
            try memory.store(UInt16(0), at: bootInfoAddress + 24)
        }
    }
}
