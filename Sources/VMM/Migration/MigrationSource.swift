import CHost
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import VirtCore

/// How a pre-copy migration decides when to stop the guest.
public struct MigrationOptions: Sendable, Equatable {
    /// Stop and copy once the pages left would take at most this long at the measured
    /// bandwidth (QEMU's default downtime limit is 300 ms).
    public private(set) var maxDowntimeSeconds: Double = 0.3
    /// Dirty rounds after the first full pass; then stop and copy whatever is left.
    public private(set) var maxRounds = 30
    /// A peer silent for this long fails the migration (and the source resumes).
    public private(set) var timeoutSeconds: Double = 10
    /// Post-copy: send the state first and the pages on demand (else pre-copy).
    public var postcopy = false
    /// Pre-copy that does not converge throttles the guest (QEMU's auto-converge): from the
    /// second round on it is held paused for a growing share of each round's sending (50 %,
    /// 75 %, … up to 99 %), so it dirties pages more slowly than they go.
    public var autoConverge = false
    /// Reconnect a post-copy migration that broke after the switch-over to its destination,
    /// listening again (`Machine.resumePostcopy`), instead of starting a new one.
    public var resume = false

    public init() {}

    public init(maxDowntimeMilliseconds: Double, maxRounds: Int = 30, timeoutSeconds: Double = 10, postcopy: Bool = false,
                autoConverge: Bool = false) throws(MigrationError) {
        self.postcopy = postcopy
        self.autoConverge = autoConverge
        try setMaxDowntime(milliseconds: maxDowntimeMilliseconds)
        try setMaxRounds(maxRounds)
        try setTimeout(seconds: timeoutSeconds)
    }

    public mutating func setMaxDowntime(milliseconds: Double) throws(MigrationError) {
        guard milliseconds.isFinite, milliseconds >= 0 else { throw .notMigratable("max downtime must be ≥ 0 ms, not \(milliseconds)") }
        maxDowntimeSeconds = milliseconds / 1000
    }

    public mutating func setMaxRounds(_ n: Int) throws(MigrationError) {
        guard n >= 0 else { throw .notMigratable("the round limit must be ≥ 0, not \(n)") }
        maxRounds = n
    }

    public mutating func setTimeout(seconds: Double) throws(MigrationError) {
        guard seconds.isFinite, seconds > 0 else { throw .notMigratable("the timeout must be > 0 s, not \(seconds)") }
        timeoutSeconds = seconds
    }
}

/// Where a migration is, for a progress display.
public struct MigrationProgress: Codable, Sendable, Equatable {
    public enum Phase: String, Codable, Sendable {
        /// The first pass over all of RAM, the guest running.
        case bulk
        /// Resending the pages the guest dirtied during the previous pass.
        case dirtyRound = "dirty-round"
        /// The guest is paused; the last pages and the vCPU and device state are going.
        case stopAndCopy = "stop-and-copy"
        /// Everything sent; waiting for the destination to confirm.
        case confirming
    }
    public var phase: Phase
    public var round: Int
    public var pagesSent: UInt64
    public var bytesSent: UInt64
    /// Pages dirtied since the last pass (what the next pass sends).
    public var dirtyPages: Int
    public var bandwidthBytesPerSecond: Double
}

/// What a finished migration did (source side).
public struct MigrationReport: Codable, Sendable, Equatable {
    public var destination: String
    public var sourceEngine: String
    public var destinationEngine: String
    /// Dirty rounds after the bulk pass.
    public var rounds: Int
    /// Pages sent, including resends, and how many of them went as zero-page markers.
    public var pagesSent: UInt64
    public var zeroPages: UInt64
    public var bytesSent: UInt64
    /// Pages sent while the guest was paused.
    public var pagesInStopAndCopy: Int
    /// From the first byte to the destination's confirmation.
    public var totalSeconds: Double
    /// The guest ran nowhere: from the source's final pause to the confirmation.
    public var downtimeSeconds: Double
    public var bandwidthBytesPerSecond: Double
    /// Dirty pages left after each round (the bulk pass first).
    public var dirtyPagesPerRound: [Int]
    /// Post-copy: what the destination measured (nil for pre-copy).
    public var postcopy: PostcopyStatistics?
    /// Auto-converge: the largest share of sending time the guest was held paused (0: none).
    public var throttle: Double = 0
}

extension Machine {
    /// Live-migrates the running machine to `address` (post-copy when `options.postcopy`:
    /// MigrationPostcopy.swift). Pre-copy: all of RAM is sent while
    /// the guest runs, then the pages it dirtied (engine dirty log ∪ host/device writes)
    /// in rounds until what is left fits `options.maxDowntimeSeconds` at the measured
    /// bandwidth or the round limit is reached; then the guest pauses, the rest goes with
    /// the vCPU and device state, and the destination confirms. The source then stops with
    /// `.migrated`. On any failure before the confirmation the guest resumes here, as if
    /// nothing had happened, and the error is thrown.
    public func migrate(to address: MigrationAddress, options: MigrationOptions = MigrationOptions(),
                        progress: ((MigrationProgress) -> Void)? = nil) throws -> MigrationReport {
        if options.resume { return try resumePostcopy(to: address, options: options, progress: progress) }
        if let reason = endReason { throw MigrationError.notMigratable("the VM has already ended (\(reason.summary)): only a running VM can be migrated") }
        try checkDevicesSavable()
        let dirtyLog = try vm.require(DirtyPageLogging.self, .dirtyLogging, neededBy: "live migration")
        guard migrationGuard.tryBegin() else { throw MigrationError.alreadyMigrating }
        defer { migrationGuard.end() }

        let clock = ContinuousClock()
        let started = clock.now
        func seconds(since t: ContinuousClock.Instant) -> Double {
            (clock.now - t).seconds
        }
        let channel = MigrationChannel(connection: try MigrationConnection.connect(to: address, timeoutSeconds: options.timeoutSeconds))
        try channel.sendPreamble()
        try channel.receivePreamble()
        let offer = MigrationOffer(sourceEngine: engine.name, memorySize: memory.size, vcpuCount: allVCPUs.count,
                                   commandLine: configuration.commandLine, guestName: configuration.guestName,
                                   deviceCount: attachedDevices.count, postcopy: options.postcopy)
        try channel.sendJSON(.offer, offer)
        let answer = try channel.receiveJSON(.accept, as: MigrationAnswer.self)
        guard answer.accepted else {
            throw MigrationError.rejected(answer.reason ?? .incompatible, message: answer.message)
        }
        if options.postcopy {
            return try migratePostcopy(channel: channel, address: address, answer: answer, started: started, progress: progress)
        }

        let transports = freezableTransports
        var logging = false, frozen = false, paused = false, committed = false
        var heldByThrottle = false
        defer {
            if !committed {
                if logging {
                    try? dirtyLog.setDirtyLogging(false)
                    memory.hostWrites.setEnabled(false)
                }
                if frozen { for t in transports { t.thaw() } }
                if paused || heldByThrottle { resume() }
                channel.connection.shutdownNow()
            }
        }
        // The software engine's dirty flags are exact only when cleared with the vCPUs
        // out of run(): a cached writable translation would skip them.
        pause()
        try dirtyLog.setDirtyLogging(true)
        memory.hostWrites.setEnabled(true)
        logging = true
        resume()

        let pageCount = Int(memory.size) / MigrationFormat.pageSize
        var pagesSent: UInt64 = 0, zeroPages: UInt64 = 0
        // Bandwidth is what the destination has consumed (its round acknowledgements) over
        // the time since the first page — not what the socket buffers took, which on
        // loopback is megabytes at memory speed.
        let sendingSince = clock.now
        var bandwidth = 0.0
        var throttle = 0.0, maxThrottle = 0.0
        func hold(_ on: Bool) {
            guard on != heldByThrottle else { return }
            if on { pause() } else { resume() }
            heldByThrottle = on
        }
        func send(_ pages: [Int], allocated: DirtyBitmap? = nil) throws {
            var i = 0, frame = 0
            defer { hold(false) }
            while i < pages.count {
                if throttle > 0 {
                    // Frame by frame: held for `throttle` of every ten frames.
                    hold(Double(frame % 10) < throttle * 10)
                    frame += 1
                }
                let batch = pages[i..<min(i + MigrationFormat.pagesPerFrame, pages.count)]
                var zeros = 0
                try channel.queue(.pages) { zeros = MigrationPageCodec.encode(pages: batch, of: memory, allocated: allocated, into: &$0) }
                zeroPages += UInt64(zeros)
                pagesSent += UInt64(batch.count)
                i += batch.count
                if throttle > 0 { try channel.flush() }
            }
            try channel.flush()
        }
        func collectDirty() throws -> DirtyBitmap {
            var bitmap = try dirtyLog.fetchDirtyLog()
            bitmap.formUnion(memory.hostWrites.collect())
            return bitmap
        }
        func report(_ phase: MigrationProgress.Phase, round: Int, dirty: Int) {
            progress?(MigrationProgress(phase: phase, round: round, pagesSent: pagesSent, bytesSent: channel.bytesSent,
                                        dirtyPages: dirty, bandwidthBytesPerSecond: bandwidth))
        }

        report(.bulk, round: 0, dirty: pageCount)
        try send(Array(0..<pageCount), allocated: MigrationPageCodec.allocatedPages(of: memory))
        var round = 0
        var dirtyPerRound: [Int] = []
        var pending: DirtyBitmap
        while true {
            // The round end goes after the pages; the destination acknowledges it once it has
            // consumed everything before it, so nothing is in flight when the dirty set is
            // measured. A throttled guest stays held meanwhile, as during the sending.
            if throttle > 0 { hold(true) }
            try channel.queue(.roundEnd) { out in
                var w = SnapshotByteWriter()
                w.u32(UInt32(round)); w.u64(pagesSent)
                out.append(contentsOf: w.bytes)
            }
            try channel.flush()
            var ack = SnapshotByteReader(try channel.receive(.roundAcknowledged), section: "round acknowledged")
            guard let consumed = try? ack.u64(), consumed <= channel.bytesSent else {
                throw MigrationError.corruptFrame("round acknowledgement")
            }
            hold(false)
            let elapsed = seconds(since: sendingSince)
            bandwidth = elapsed > 0 ? Double(consumed) / elapsed : 0
            pause()
            do { pending = try collectDirty() } catch { resume(); throw error }
            resume()
            let left = pending.dirtyCount
            dirtyPerRound.append(left)
            let estimate = bandwidth > 0 ? Double(left * MigrationFormat.pageSize) / bandwidth : .infinity
            if estimate <= options.maxDowntimeSeconds || round >= options.maxRounds { break }
            if options.autoConverge && round >= 1 {
                throttle = throttle == 0 ? 0.5 : min(0.99, throttle + (1 - throttle) / 2)
                maxThrottle = throttle
            }
            round += 1
            report(.dirtyRound, round: round, dirty: left)
            try send(pending.dirtyPages)
        }

        // Stop and copy: the guest and its devices stand still from here to the confirmation
        // (no throttling: it would resume the guest between frames).
        throttle = 0
        let downtimeStart = clock.now
        pause()
        paused = true
        for t in transports { t.freeze() }
        frozen = true
        pending.formUnion(try collectDirty())
        let last = pending.dirtyPages
        report(.stopAndCopy, round: round, dirty: last.count)
        try send(last)
        let states = try allVCPUs.map { try $0.getState() }
        try channel.queue(.vcpus, SnapshotVCPUCodec.encode(states))
        try channel.queue(.devices, SnapshotDeviceCodec.encode(try savedDeviceStates()))
        try channel.queue(.complete) { out in
            var w = SnapshotByteWriter()
            w.u64(pagesSent)
            out.append(contentsOf: w.bytes)
        }
        try channel.flush()
        report(.confirming, round: round, dirty: 0)
        _ = try channel.receive(.confirm)
        committed = true
        let downtime = seconds(since: downtimeStart)
        try? dirtyLog.setDirtyLogging(false)
        memory.hostWrites.setEnabled(false)
        requestStop(.migrated(destination: address.description))
        return MigrationReport(destination: address.description, sourceEngine: engine.name, destinationEngine: answer.engine,
                               rounds: round, pagesSent: pagesSent, zeroPages: zeroPages, bytesSent: channel.bytesSent,
                               pagesInStopAndCopy: last.count, totalSeconds: seconds(since: started),
                               downtimeSeconds: downtime, bandwidthBytesPerSecond: bandwidth,
                               dirtyPagesPerRound: dirtyPerRound, postcopy: nil, throttle: maxThrottle)
    }
}

/// One migration of a machine at a time.
final class MigrationGuard: Sendable {
    private let active = Atomic<Bool>(false)
    func tryBegin() -> Bool { !active.exchange(true, ordering: .acquiringAndReleasing) }
    var isActive: Bool { active.load(ordering: .acquiring) }
    func end() { active.store(false, ordering: .releasing) }
}
