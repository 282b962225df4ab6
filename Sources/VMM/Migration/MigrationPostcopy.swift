import CHost
import Dispatch
import FoundationEssentials
import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// What the destination measured while post-copy filled its RAM.
public struct PostcopyStatistics: Codable, Sendable, Equatable {
    /// Guest (or device) accesses that found their page missing and asked the source.
    public var remoteFaults: Int
    /// Fault to page in place, for the faults that asked the source (µs).
    public var medianFaultMicroseconds: Double
    public var maxFaultMicroseconds: Double
    public var pagesReceived: Int
}

// MARK: - Source

extension Machine {
    /// Bytes of background push allowed in flight (unacknowledged) during post-copy.
    static let postcopyPushWindow: Int32 = 64 << 10

    /// Post-copy source: the vCPU and device state (and the first MiB of RAM, which holds
    /// boot info and the page tables) go first; once the destination confirms, the guest
    /// runs there and this side answers its page requests ahead of a background push of
    /// every other page. Before the confirmation a failure resumes the guest here; after
    /// it, this machine stays stopped with all its pages (`postcopyInterrupted`).
    func migratePostcopy(channel: MigrationChannel, address: MigrationAddress, answer: MigrationAnswer,
                         started: ContinuousClock.Instant,
                         progress: ((MigrationProgress) -> Void)?) throws -> MigrationReport {
        let clock = ContinuousClock()
        func seconds(since t: ContinuousClock.Instant) -> Double {
            (clock.now - t).seconds
        }
        let pageCount = Int(memory.size) / MigrationFormat.pageSize
        let transports = freezableTransports
        let downtimeStart = clock.now
        pause()
        for t in transports { t.freeze() }
        var committed = false
        defer {
            if !committed {
                for t in transports { t.thaw() }
                resume()
            }
            channel.connection.shutdownNow()
        }
        // Pages that are holes here are zero there without being sent or faulted on.
        let allocated = MigrationPageCodec.allocatedPages(of: memory)
        var initiallySent = DirtyBitmap(pageCount: pageCount)
        for p in 0..<pageCount where !allocated[p] { initiallySent[p] = true }
        let pages = PostcopyPageSender(channel: channel, memory: memory, sent: initiallySent)
        func report(_ phase: MigrationProgress.Phase) {
            let sentSoFar = pages.pagesSent
            progress?(MigrationProgress(phase: phase, round: 0, pagesSent: sentSoFar, bytesSent: pages.bytesSent,
                                        dirtyPages: pageCount - Int(sentSoFar), bandwidthBytesPerSecond: 0))
        }
        report(.stopAndCopy)
        try channel.queue(.vcpus, SnapshotVCPUCodec.encode(try allVCPUs.map { try $0.getState() }))
        try channel.queue(.devices, SnapshotDeviceCodec.encode(try savedDeviceStates()))
        try pages.send(Array(0..<min(pageCount, Int(BootLayout.imageBase) / MigrationFormat.pageSize)))
        // The pages the destination must fetch: everything not sent yet.
        let sent = pages.sentPages
        var start = SnapshotByteWriter()
        start.u64(UInt64(pageCount))
        for i in 0..<(pageCount + 63) / 64 { start.u64(~sent.words[i] & (i == (pageCount - 1) / 64 && pageCount % 64 != 0 ? (1 << UInt64(pageCount % 64)) - 1 : ~0)) }
        try pages.sendFrame(.postcopyStart, start.bytes)

        var downtime = 0.0
        let statistics: PostcopyStatistics
        do {
            statistics = try servePostcopy(channel: channel, pages: pages, committed: false) {
                committed = true
                downtime = seconds(since: downtimeStart)
                requestStop(.migrated(destination: address.description))
                report(.confirming)
            }
        } catch let error as MigrationError where committed {
            throw keepForRecovery(pages, pageCount: pageCount, answer: answer, address: address, cause: error)
        }
        return MigrationReport(destination: address.description, sourceEngine: engine.name, destinationEngine: answer.engine,
                               rounds: 0, pagesSent: pages.pagesSent, zeroPages: pages.zeroPages, bytesSent: pages.bytesSent,
                               pagesInStopAndCopy: 0, totalSeconds: seconds(since: started), downtimeSeconds: downtime,
                               bandwidthBytesPerSecond: 0, dirtyPagesPerRound: [], postcopy: statistics, throttle: 0)
    }

    /// After the switch-over the guest runs at the destination, so a broken stream cannot
    /// resume it here: this machine keeps every page the destination may lack, for
    /// `resumePostcopy` (QEMU's post-copy recovery).
    private func keepForRecovery(_ pages: PostcopyPageSender, pageCount: Int, answer: MigrationAnswer, address: MigrationAddress,
                                 cause: MigrationError) -> MigrationError {
        postcopyRecovery.withLock { $0 = PostcopyRecoveryState(destinationEngine: answer.engine, pageCount: pageCount) }
        return MigrationError.postcopyInterrupted(pagesDelivered: pages.sentPages.dirtyCount, pageCount: pageCount, cause: cause.description)
    }

    /// Whether a post-copy migration of this machine broke after the switch-over and waits
    /// for `resumePostcopy`.
    public var awaitsPostcopyRecovery: Bool { postcopyRecovery.withLock { $0 != nil } }

    /// Blocks while a migration of this machine goes on (a post-copy one outlives the guest
    /// here) and, when one broke after the switch-over, until a resume has finished it: the
    /// pages this machine holds exist nowhere else. `onInterrupted` is told once, when the
    /// wait for a resume begins.
    public func waitWhileMigrating(onInterrupted: () -> Void) {
        var told = false
        while migrationGuard.isActive || awaitsPostcopyRecovery {
            if !told && !migrationGuard.isActive && awaitsPostcopyRecovery {
                onInterrupted()
                told = true
            }
            usleep(20_000)
        }
    }

    /// Reconnects a post-copy migration that broke after the switch-over to its destination
    /// (listening again at `address`): the destination says which pages it holds, and this
    /// side serves its faults and pushes the rest, as before the break. On failure the
    /// pages stay here for another attempt.
    public func resumePostcopy(to address: MigrationAddress, options: MigrationOptions = MigrationOptions(),
                               progress: ((MigrationProgress) -> Void)? = nil) throws -> MigrationReport {
        guard let state = postcopyRecovery.withLock({ $0 }) else {
            throw MigrationError.notMigratable("no interrupted post-copy migration to resume")
        }
        guard migrationGuard.tryBegin() else { throw MigrationError.alreadyMigrating }
        defer { migrationGuard.end() }
        let clock = ContinuousClock()
        let started = clock.now
        let channel = MigrationChannel(connection: try MigrationConnection.connect(to: address, timeoutSeconds: options.timeoutSeconds))
        defer { channel.connection.shutdownNow() }
        try channel.sendPreamble()
        try channel.receivePreamble()
        let offer = MigrationOffer(sourceEngine: engine.name, memorySize: memory.size, vcpuCount: allVCPUs.count,
                                   commandLine: configuration.commandLine, guestName: configuration.guestName,
                                   deviceCount: attachedDevices.count, postcopy: true, resume: true)
        try channel.sendJSON(.offer, offer)
        let answer = try channel.receiveJSON(.accept, as: MigrationAnswer.self)
        guard answer.accepted else { throw MigrationError.rejected(answer.reason ?? .incompatible, message: answer.message) }
        var r = SnapshotByteReader(try channel.receive(.resumeState), section: "resume state")
        guard let count = try? r.u64(), count == UInt64(state.pageCount) else {
            throw MigrationError.corruptFrame("resume state: page count")
        }
        var words: [UInt64] = []
        for _ in 0..<(state.pageCount + 63) / 64 {
            guard let w = try? r.u64() else { throw MigrationError.corruptFrame("resume state: page bitmap is short") }
            words.append(w)
        }
        let held = DirtyBitmap(pageCount: state.pageCount, words: words)
        progress?(MigrationProgress(phase: .confirming, round: 0, pagesSent: UInt64(held.dirtyCount), bytesSent: channel.bytesSent,
                                    dirtyPages: state.pageCount - held.dirtyCount, bandwidthBytesPerSecond: 0))
        // Pages the destination does not hold go again, whether sent before the break or not.
        let pages = PostcopyPageSender(channel: channel, memory: memory, sent: held)
        let statistics = try servePostcopy(channel: channel, pages: pages, committed: true) {}
        postcopyRecovery.withLock { $0 = nil }
        let seconds = (clock.now - started).seconds
        return MigrationReport(destination: address.description, sourceEngine: engine.name, destinationEngine: state.destinationEngine,
                               rounds: 0, pagesSent: pages.pagesSent, zeroPages: pages.zeroPages, bytesSent: pages.bytesSent,
                               pagesInStopAndCopy: 0, totalSeconds: seconds, downtimeSeconds: 0,
                               bandwidthBytesPerSecond: 0, dirtyPagesPerRound: [], postcopy: statistics, throttle: 0)
    }

    /// The post-copy source's side of the stream once the state is sent: the destination's
    /// frames arrive on their own thread, which answers page requests itself (one thread hop
    /// fewer per remote fault) and hands the confirmation, the final statistics or an error
    /// to this one, which pushes every other page meanwhile. `onCommit` runs when the
    /// destination confirms (never when `committed` already).
    private func servePostcopy(channel: MigrationChannel, pages: PostcopyPageSender, committed alreadyCommitted: Bool,
                               onCommit: () -> Void) throws -> PostcopyStatistics {
        let pageCount = Int(memory.size) / MigrationFormat.pageSize
        let inbox = PostcopyInbox()
        // SAFETY: the reader thread only receives on the channel; sends go through `pages`,
        // which serialises them.
        nonisolated(unsafe) let reader = channel
        let readerThread = HostThread(name: "postcopy-requests") {
            while true {
                do {
                    let frame = try reader.receive(expecting: "page requests")
                    switch frame.kind {
                    case .pageRequest:
                        var r = SnapshotByteReader(Array(frame.payload), section: "page request")
                        guard let page = try? r.u64(), page < UInt64(pageCount) else { throw MigrationError.corruptFrame("page request") }
                        _ = try pages.sendIfUnsent(Int(page))
                    case .confirm: inbox.confirm()
                    case .postcopyDone:
                        inbox.finish(try? JSONDecoder().decode(PostcopyStatistics.self, from: Data(frame.payload)))
                        return
                    default: throw MigrationError.unexpectedFrame(got: frame.kind.description, expecting: "page requests")
                    }
                } catch MigrationError.timedOut(_) where !inbox.isFinished && !inbox.allPagesSent {
                    continue  // a quiet destination is not a dead one while pages still go out
                } catch {
                    inbox.fail(error as? MigrationError ?? .peerFailed("\(error)"))
                    return
                }
            }
        }
        defer { channel.connection.shutdownNow(); readerThread.join() }

        var committed = alreadyCommitted
        var next = 0
        var completeSent = false
        while true {
            // Pushed pages queue ahead of demanded ones in the stream: push only while little
            // is unacknowledged, so a request waits behind at most that much.
            let throttled = committed && !completeSent && host_socket_unsent_bytes(channel.connection.fd) > Self.postcopyPushWindow
            let (confirmed, error, statistics) = inbox.take(waitIfIdle: !committed || completeSent || throttled,
                                                            milliseconds: throttled ? 1 : 20)
            if let error { throw error }
            if confirmed && !committed {
                committed = true
                onCommit()
            }
            if let statistics { return statistics }
            guard committed, !completeSent, !throttled else { continue }
            // Background push: a few pages at a time, so a request waits little for the lock.
            next = try pages.pushUnsent(from: next, upTo: 16)
            if next == pageCount {
                try pages.sendFrame(.complete, { var w = SnapshotByteWriter(); w.u64(pages.pagesSent); return w.bytes }())
                completeSent = true
                inbox.markAllPagesSent()
            }
        }
    }
}

/// What a source keeps of a post-copy migration that broke after the switch-over (the
/// pages themselves are its RAM).
struct PostcopyRecoveryState: Sendable {
    var destinationEngine: String
    var pageCount: Int
}

/// The post-copy source's sending side, shared by the thread that pushes every page in the
/// background and the reader thread that answers page requests: one frame at a time on the
/// channel, and each page sent once.
final class PostcopyPageSender: @unchecked Sendable {
    // SAFETY: every use of `channel`'s sending side, `sent` and the counters holds `lock`.
    private let lock = HostLock()
    private let channel: MigrationChannel
    private let memory: GuestMemory
    private var sent: DirtyBitmap
    private var sentCount: UInt64 = 0
    private var zeroCount: UInt64 = 0

    init(channel: MigrationChannel, memory: GuestMemory, sent: DirtyBitmap) {
        self.channel = channel
        self.memory = memory
        self.sent = sent
    }

    var pagesSent: UInt64 { lock.withLock { sentCount } }
    var zeroPages: UInt64 { lock.withLock { zeroCount } }
    var bytesSent: UInt64 { lock.withLock { channel.bytesSent } }
    var sentPages: DirtyBitmap { lock.withLock { sent } }

    /// Sends `pages` (whether sent before or not) and flushes.
    func send(_ pages: [Int]) throws(MigrationError) {
        try lock.withLock { () throws(MigrationError) in try sendLocked(pages[...]) }
    }

    /// Sends `page` unless it went already; true when it was sent now.
    func sendIfUnsent(_ page: Int) throws(MigrationError) -> Bool {
        try lock.withLock { () throws(MigrationError) -> Bool in
            guard !sent[page] else { return false }
            try sendLocked([page][...])
            return true
        }
    }

    /// Sends up to `limit` unsent pages found from `start` on; returns where the search stopped.
    func pushUnsent(from start: Int, upTo limit: Int) throws(MigrationError) -> Int {
        try lock.withLock { () throws(MigrationError) -> Int in
            var batch: [Int] = []
            var next = start
            while next < sent.pageCount, batch.count < limit {
                if !sent[next] { batch.append(next) }
                next += 1
            }
            if !batch.isEmpty { try sendLocked(batch[...]) }
            return next
        }
    }

    func sendFrame(_ kind: MigrationFrameKind, _ payload: [UInt8]) throws(MigrationError) {
        try lock.withLock { () throws(MigrationError) in try channel.send(kind, payload) }
    }

    private func sendLocked(_ pages: ArraySlice<Int>) throws(MigrationError) {
        var i = pages.startIndex
        while i < pages.endIndex {
            let batch = pages[i..<min(i + MigrationFormat.pagesPerFrame, pages.endIndex)]
            var zeros = 0
            try channel.queue(.pages) { zeros = MigrationPageCodec.encode(pages: batch, of: memory, allocated: nil, into: &$0) }
            for p in batch { sent[p] = true }
            zeroCount += UInt64(zeros)
            sentCount += UInt64(batch.count)
            i = batch.endIndex
        }
        try channel.flush()
    }
}

/// What the post-copy source's reader thread hands its sender.
final class PostcopyInbox: Sendable {
    private struct State {
        var confirmed = false
        var error: MigrationError?
        var statistics: PostcopyStatistics?
        var finished = false
    }
    private let state = Mutex(State())
    private let signal = DispatchSemaphore(value: 0)
    private let sentEverything = Atomic<Bool>(false)

    /// The complete frame is out: from now on the destination owes an answer in time.
    var allPagesSent: Bool { sentEverything.load(ordering: .acquiring) }
    func markAllPagesSent() { sentEverything.store(true, ordering: .releasing) }

    var isFinished: Bool { state.withLock { $0.finished } }
    func confirm() { state.withLock { $0.confirmed = true }; signal.signal() }
    func fail(_ error: MigrationError) { state.withLock { $0.error = error; $0.finished = true }; signal.signal() }
    func finish(_ statistics: PostcopyStatistics?) {
        state.withLock {
            $0.statistics = statistics ?? PostcopyStatistics(remoteFaults: 0, medianFaultMicroseconds: 0, maxFaultMicroseconds: 0, pagesReceived: 0)
            $0.finished = true
        }
        signal.signal()
    }

    /// Whether confirmed, an error, the final statistics. With `waitIfIdle`, waits (bounded)
    /// for something to happen when nothing is pending.
    func take(waitIfIdle: Bool, milliseconds: Int) -> (Bool, MigrationError?, PostcopyStatistics?) {
        func snapshot() -> (Bool, MigrationError?, PostcopyStatistics?) {
            state.withLock { s in (s.confirmed, s.error, s.statistics) }
        }
        let now = snapshot()
        if !waitIfIdle || now.1 != nil || now.2 != nil { return now }
        _ = signal.wait(timeout: .now() + .milliseconds(milliseconds))
        return snapshot()
    }
}

// MARK: - Destination

/// Post-copy destination: guest RAM registered with userfaultfd in missing-page mode
/// (the lazy restore's mechanism, for both engines: a KVM vCPU, the software engine's
/// translated code or interpreter, and a device all fault the same way). A fault thread
/// asks the source for each page first touched; a receiver thread places pages as they
/// arrive (demanded or pushed) with UFFDIO_COPY, which wakes the faulting thread.
final class PostcopyReceiver: @unchecked Sendable {
    // SAFETY: fds are immutable; the channel's sends are serialised by `sendLock`, and only
    // the receiver thread receives; only it replaces `channel` (on a resume), holding
    // `sendLock`; the page bitmap and timings are behind Mutexes; the recovery hooks are set
    // before start().
    private let uffd: Int32
    private let stopFD: Int32
    private let memory: GuestMemory
    private var channel: MigrationChannel
    private let sendLock = Mutex(())
    private let pageCount: Int
    private let received: Mutex<DirtyBitmap>
    private let requestedAt = Mutex<[Int: UInt64]>([:])
    private let latencies = Mutex<[UInt64]>([])
    private let registered: [Range<Int>]
    private var faultThread: HostThread?
    private var receiveThread: HostThread?
    let finished = Atomic<Bool>(false)
    /// Told when the stream fails before every page is in and no source resumes it (the
    /// machine then stops).
    let onFailure = LockedFunction<@Sendable (String) -> Void>()
    /// After a break, waits up to the given seconds for the source to reconnect (nil: none).
    var awaitResume: (@Sendable (Double) -> MigrationConnection?)?
    /// How long a broken stream waits for the source to resume (0: the guest stops at once).
    var recoverySeconds = 0.0
    /// This side's engine, for the answer to a resuming source.
    var engineName = ""

    /// Registers the `remote` pages (those still at the source) for missing faults; the
    /// others are in place already or zero.
    init(channel: MigrationChannel, memory: GuestMemory, remote: DirtyBitmap) throws(MigrationError) {
        let fd = host_uffd_open(0)
        guard fd >= 0 else { throw .restoreFailed("userfaultfd is unavailable (errno \(-fd)); post-copy needs it") }
        var runs: [Range<Int>] = []
        var page = 0
        while page < remote.pageCount {
            guard remote[page] else { page += 1; continue }
            let first = page
            while page < remote.pageCount && remote[page] { page += 1 }
            runs.append(first..<page)
        }
        for run in runs {
            let rc = host_uffd_register(fd, memory.base + run.lowerBound * MigrationFormat.pageSize,
                                        UInt64(run.count * MigrationFormat.pageSize), 0, 1)
            guard rc == 0 else { close(fd); throw .restoreFailed("userfaultfd registration failed (errno \(-rc))") }
        }
        uffd = fd
        registered = runs
        var present = DirtyBitmap(pageCount: remote.pageCount)
        for p in 0..<remote.pageCount where !remote[p] { present[p] = true }
        stopFD = host_eventfd()
        self.memory = memory
        self.channel = channel
        pageCount = Int(memory.size) / MigrationFormat.pageSize
        received = Mutex(present)
    }

    /// Starts serving faults (call once the machine exists).
    func start() {
        faultThread = HostThread(name: "postcopy-faults") { [self] in faultLoop() }
        receiveThread = HostThread(name: "postcopy-pages") { [self] in receiveLoop() }
    }

    func send(_ kind: MigrationFrameKind, _ payload: [UInt8]) throws(MigrationError) {
        let sent: Result<Void, MigrationError> = sendLock.withLock { _ in
            Result { () throws(MigrationError) in try channel.send(kind, payload) }
        }
        try sent.get()
    }

    var statistics: PostcopyStatistics {
        let l = latencies.withLock { $0 }.sorted()
        return PostcopyStatistics(remoteFaults: l.count, medianFaultMicroseconds: l.isEmpty ? 0 : Double(l[l.count / 2]) / 1000,
                                  maxFaultMicroseconds: Double(l.last ?? 0) / 1000,
                                  pagesReceived: received.withLock { $0.dirtyCount })
    }

    private func faultLoop() {
        let base = UInt(bitPattern: memory.base)
        var address: UInt64 = 0
        var isWrite: Int32 = 0, isWP: Int32 = 0
        while host_uffd_next_fault(uffd, stopFD, -1, &address, &isWrite, &isWP) == 1 {
            let page = Int((UInt(address) - base) >> 12)
            guard page >= 0, page < pageCount, !received.withLock({ $0[page] }) else { continue }
            let fresh = requestedAt.withLock { r -> Bool in
                guard r[page] == nil else { return false }
                r[page] = monotonicNanoseconds()
                return true
            }
            guard fresh else { continue }
            // A broken stream is the receiver's to report or resume; a resumed one asks again
            // for every page still wanted.
            try? requestPage(page)
        }
    }

    private func requestPage(_ page: Int) throws(MigrationError) {
        var w = SnapshotByteWriter()
        w.u64(UInt64(page))
        try send(.pageRequest, w.bytes)
    }

    private func receiveLoop() {
        let zero = UnsafeMutableRawPointer.allocate(byteCount: MigrationFormat.pageSize, alignment: MigrationFormat.pageSize)
        zero.initializeMemory(as: UInt8.self, repeating: 0, count: MigrationFormat.pageSize)
        defer {
            zero.deallocate()
            _ = host_eventfd_signal(stopFD)  // every page is in (or never will be): faults end
        }
        while true {
            do {
                try receivePages(zero: zero)
                return
            } catch {
                // The guest waits on its missing pages (threads touching them stay blocked)
                // while the source may reconnect; then the stream goes on where it broke.
                sendLock.withLock { _ in channel.connection.shutdownNow() }
                if recoverySeconds > 0, let connection = awaitResume?(recoverySeconds), resume(on: connection) { continue }
                // It cannot go on without the source's pages: stop it, tell the source, then
                // fill what is missing with zeros only so the threads blocked on those pages
                // reach their stop.
                onFailure.function?("\(error); the source keeps the missing pages")
                sendLock.withLock { _ in channel.sendFailure("\(error)") }
                for page in 0..<pageCount where !received.withLock({ $0[page] }) {
                    _ = host_uffd_copy(uffd, memory.base + page * MigrationFormat.pageSize, zero, UInt64(MigrationFormat.pageSize))
                }
                return
            }
        }
    }

    /// Pages as they come, until the source's complete frame.
    private func receivePages(zero: UnsafeMutableRawPointer) throws {
        while true {
            let frame = try channel.receive(expecting: "post-copy pages")
            switch frame.kind {
            case .pages:
                _ = try MigrationPageCodec.forEachPage(frame.payload, pageCount: pageCount) { (page, data) throws(MigrationError) in
                    let target = memory.base + page * MigrationFormat.pageSize
                    let rc = host_uffd_copy(uffd, target, data ?? UnsafeRawPointer(zero), UInt64(MigrationFormat.pageSize))
                    // EEXIST: a page sent twice (again after a resume) is already in place.
                    guard rc == 0 || rc == -EEXIST else { throw .restoreFailed("UFFDIO_COPY of page \(page) failed (errno \(-rc))") }
                    received.withLock { $0[page] = true }
                    if let t = requestedAt.withLock({ $0.removeValue(forKey: page) }) {
                        let elapsed = monotonicNanoseconds() - t
                        latencies.withLock { $0.append(elapsed) }
                    }
                }
            case .complete:
                let missing = received.withLock { pageCount - $0.dirtyCount }
                guard missing == 0 else { throw MigrationError.corruptFrame("post-copy completed with \(missing) pages missing") }
                finished.store(true, ordering: .releasing)
                let encoder = JSONEncoder()
                try send(.postcopyDone, (try? encoder.encode(statistics)).map { Array($0) } ?? [])
                return
            default:
                throw MigrationError.unexpectedFrame(got: frame.kind.description, expecting: "pages")
            }
        }
    }

    /// Takes a reconnecting source: its offer must resume this machine; the answer says
    /// which pages are here, and the pages still wanted are asked for again.
    private func resume(on connection: MigrationConnection) -> Bool {
        let fresh = MigrationChannel(connection: connection)
        do throws(MigrationError) {
            try fresh.sendPreamble()
            try fresh.receivePreamble()
            let offer = try fresh.receiveJSON(.offer, as: MigrationOffer.self)
            guard offer.resume == true, offer.postcopy, offer.memorySize == memory.size else {
                try fresh.sendJSON(.accept, MigrationAnswer(accepted: false, engine: engineName, reason: .busy,
                                                            message: "a post-copy migration waits here for its source to resume it"))
                return false
            }
            try fresh.sendJSON(.accept, MigrationAnswer(accepted: true, engine: engineName, reason: nil, message: ""))
            var small: Int32 = 256 << 10
            setsockopt(connection.fd, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
            let held = received.withLock { $0 }
            var state = SnapshotByteWriter()
            state.u64(UInt64(pageCount))
            for word in held.words { state.u64(word) }
            try fresh.send(.resumeState, state.bytes)
            sendLock.withLock { _ in channel = fresh }
            for page in requestedAt.withLock({ Array($0.keys) }) { try requestPage(page) }
            return true
        } catch {
            connection.shutdownNow()
            return false
        }
    }

    deinit {
        _ = host_eventfd_signal(stopFD)
        channel.connection.shutdownNow()
        faultThread?.join()
        receiveThread?.join()
        for run in registered {
            _ = host_uffd_unregister(uffd, memory.base + run.lowerBound * MigrationFormat.pageSize, UInt64(run.count * MigrationFormat.pageSize))
        }
        close(uffd)
        close(stopFD)
    }
}
