import Foundation
import Synchronization
import Testing
import TestSupport
import VirtCore
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// A TCP relay between a source and a destination that cuts both connections after
/// `cutAfter` bytes from the source, or flips the byte at `corruptAt` (real sockets, real
/// resets: what a failing network does).
final class FaultyRelay: @unchecked Sendable {
    // SAFETY: the sockets are used by the relay thread only; `thread` by the test's.
    private let listener: MigrationListeningSocket
    private var thread: HostThread?

    var address: MigrationAddress { listener.address }

    init(to target: MigrationAddress, cutAfter: Int? = nil, corruptAt: Int? = nil) throws {
        listener = try MigrationListeningSocket(address: .tcp(host: "127.0.0.1", port: 0))
        thread = HostThread(name: "relay") { [listener] in
            guard let a = listener.accept(timeoutSeconds: 10),
                  let b = try? MigrationConnection.connect(to: target, timeoutSeconds: 10) else { return }
            var fds = [pollfd(fd: a.fd, events: Int16(POLLIN), revents: 0), pollfd(fd: b.fd, events: Int16(POLLIN), revents: 0)]
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            var sent = 0
            loop: while poll(&fds, 2, 10_000) > 0 {
                for (i, (from, to)) in [(a.fd, b.fd), (b.fd, a.fd)].enumerated() where fds[i].revents != 0 {
                    var n = buffer.withUnsafeMutableBytes { recv(from, $0.baseAddress, $0.count, 0) }
                    if n <= 0 { break loop }
                    if i == 0 {
                        if let c = corruptAt, c >= sent, c < sent + n { buffer[c - sent] ^= 0x5A }
                        if let cut = cutAfter, sent + n >= cut {
                            n = cut - sent
                            _ = buffer.withUnsafeBytes { send(to, $0.baseAddress, n, Int32(MSG_NOSIGNAL)) }
                            break loop
                        }
                        sent += n
                    }
                    var off = 0
                    while off < n {
                        let w = buffer.withUnsafeBytes { send(to, $0.baseAddress! + off, n - off, Int32(MSG_NOSIGNAL)) }
                        if w <= 0 { break loop }
                        off += w
                    }
                }
            }
            a.shutdownNow()
            b.shutdownNow()
        }
    }

    func finish() {
        thread?.join()
        thread = nil
        listener.close()
    }

    deinit { finish() }
}

/// SplitMix64: the cut points are the same on every run.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite struct MigrationFaultTests {
    static let options: MigrationOptions = try! MigrationOptions(maxDowntimeMilliseconds: 50, maxRounds: 3, timeoutSeconds: 3)

    /// The source's guest is still running here and its area is intact.
    func expectSourceRunsOn(_ source: IntegrityGuest, _ area: (base: UInt64, pages: Int), _ context: String) throws {
        #expect(source.result.withLock { $0 } == nil, "the source machine is still running (\(context))")
        #expect(waitForMoreMarkers(source.output, 1), "the guest continues at the source (\(context))")
        source.machine.pause()
        defer { source.machine.resume() }
        #expect(try Integrity.check(source.machine.memory, base: area.base, pages: area.pages) == nil, "\(context)")
    }

    func destination(_ engine: EngineChoice = .software, memoryLimit: UInt64? = nil, preallocate: UInt64? = nil) throws -> IncomingMigration {
        var options = IncomingMigrationOptions(engine: try TestEngines.make(engine), memoryLimit: memoryLimit)
        options.timeoutSeconds = 3
        options.preallocateBytes = preallocate
        return try IncomingMigration(listeningOn: .tcp(host: "127.0.0.1", port: 0), options: options)
    }

    @Test(arguments: TestEngines.available)
    func connectionCutAtSeededPointsLeavesTheSourceRunning(engine: EngineChoice) throws {
        let source = try IntegrityGuest(engine: engine)
        source.start()
        defer { source.stop() }
        #expect(waitForMoreMarkers(source.output, 2))
        let area = try #require(Integrity.area(source.output.text))
        // Preallocating: the first attempt past the offer takes the prepared RAM, later ones
        // must neither wait for it nor reuse it.
        let incoming = try destination(engine, preallocate: source.machine.memory.size)
        defer { incoming.close() }
        // The length of a whole stream, to spread the cuts over: about the area plus code. The
        // real stream can be shorter (a page whose counter byte wrapped to 0 is a zero page),
        // so a cut may fall past its end: that migration completes, and so would every larger
        // cut, so the loop ends there with the completed migration checked instead.
        let streamLength = (area.pages + 64) * 4100
        var rng = SeededGenerator(state: 17)
        var points = [3, 16, 40] + (0..<9).map { _ in Int.random(in: 100..<streamLength, using: &rng) }
        points.sort()
        var cutsInsideTheStream = 0
        for cut in points {
            let relay = try FaultyRelay(to: incoming.address, cutAfter: cut)
            let receiver = Receiver(incoming)
            do {
                _ = try source.machine.migrate(to: relay.address, options: Self.options)
                relay.finish()
                let (machine, _) = try receiver.join().get()
                #expect(try Integrity.check(machine.memory, base: area.base, pages: area.pages) == nil, "cut after \(cut) bytes, past the end")
                #expect(cutsInsideTheStream >= 3, "at least the cuts in the preamble and the offer interrupt the stream")
                return
            } catch is MigrationError {}
            cutsInsideTheStream += 1
            relay.finish()
            let arrived = receiver.join()
            #expect(throws: MigrationError.self, "the destination gives up on a cut stream") { try arrived.get() }
            try expectSourceRunsOn(source, area, "cut after \(cut) bytes")
        }
        // And the same destination still takes a whole migration afterwards.
        let receiver = Receiver(incoming)
        _ = try source.machine.migrate(to: incoming.address, options: Self.options)
        let (machine, _) = try receiver.join().get()
        #expect(try Integrity.check(machine.memory, base: area.base, pages: area.pages) == nil)
    }

    /// A Unix socket path longer than `sun_path` is a typed error, never an overrun (the
    /// address was once copied into `sun_path` unchecked).
    @Test func overlongUnixSocketPathIsRefused() {
        let path = "/tmp/" + String(repeating: "p", count: 200) + ".sock"
        #expect(throws: MigrationError.self) { try MigrationAddress.unix(path: path).socketAddresses() }
        #expect(throws: MigrationError.self) { try MigrationConnection.connect(to: .unix(path: path), timeoutSeconds: 1) }
        #expect((try? MigrationAddress.unix(path: "/tmp/m.sock").socketAddresses().count) == 1)
    }

    @Test func corruptedByteIsCaughtByTheFrameChecksum() throws {
        let source = try IntegrityGuest(engine: .software)
        source.start()
        defer { source.stop() }
        #expect(waitForMoreMarkers(source.output, 2))
        let area = try #require(Integrity.area(source.output.text))
        let incoming = try destination()
        defer { incoming.close() }
        for offset in [40, 5000, 700_000, 2_000_000] {
            let relay = try FaultyRelay(to: incoming.address, corruptAt: offset)
            let receiver = Receiver(incoming)
            #expect(throws: MigrationError.self) { try source.machine.migrate(to: relay.address, options: Self.options) }
            relay.finish()
            guard case let .failure(error) = receiver.join(), case .corruptFrame = error as? MigrationError else {
                Issue.record("the destination reports a corrupt frame for byte \(offset) flipped"); continue
            }
            try expectSourceRunsOn(source, area, "byte \(offset) flipped")
        }
    }

    /// A hand-made source: raw bytes to the destination, whose typed error is returned.
    func destinationError(sending bytes: [UInt8]) throws -> MigrationError? {
        let incoming = try destination()
        defer { incoming.close() }
        let receiver = Receiver(incoming)
        let c = try MigrationConnection.connect(to: incoming.address, timeoutSeconds: 3)
        try c.send(bytes)
        // Half-close: the destination reads to the end of what was sent (a full close would
        // answer its reply with a reset that discards unread data).
        Glibc.shutdown(c.fd, Int32(SHUT_WR))
        switch receiver.join() {
        case .success: return nil
        case let .failure(e): return e as? MigrationError
        }
    }

    func frame(_ kind: UInt32, _ payload: [UInt8], crcDelta: UInt32 = 0) -> [UInt8] {
        var w = SnapshotByteWriter()
        w.u32(kind); w.u32(UInt32(payload.count))
        let crc = SnapshotCRC32C.update(SnapshotCRC32C.checksum(w.bytes), payload, payload.count)
        w.u32(crc &+ crcDelta); w.raw(payload)
        return w.bytes
    }

    @Test func destinationReportsTypedErrorsForBadStreams() throws {
        let offer = Array(#"{"commandLine":"","deviceCount":0,"guestName":"x","memorySize":4194304,"sourceEngine":"software","vcpuCount":1}"#.utf8)
        #expect(try destinationError(sending: Array("GET / HTTP/1.1\r\n".utf8)) == .notAMigrationStream)
        let other = MigrationFormat.version + 1
        #expect(try destinationError(sending: MigrationFormat.preamble(version: other)) == .unsupportedVersion(found: other, supported: MigrationFormat.version))
        let truncated = MigrationFormat.preamble() + Array(frame(1, offer).prefix(30))
        #expect(try destinationError(sending: truncated) == .connectionClosed(expecting: "the offer frame"))
        guard case .corruptFrame = try destinationError(sending: MigrationFormat.preamble() + frame(1, offer, crcDelta: 1)) else {
            Issue.record("a checksum mismatch is corruptFrame"); return
        }
        guard case .corruptFrame = try destinationError(sending: MigrationFormat.preamble() + frame(1, Array("{}".utf8))) else {
            Issue.record("an offer that does not decode is corruptFrame"); return
        }
        var huge = SnapshotByteWriter()
        huge.u32(4); huge.u32(UInt32.max); huge.u32(0)
        guard case .corruptFrame = try destinationError(sending: MigrationFormat.preamble() + huge.bytes) else {
            Issue.record("a frame over the size limit is refused before it is read"); return
        }
        // Pages outside the offered RAM, in a well-formed frame after an accepted offer.
        var pages = SnapshotByteWriter()
        pages.u32(1); pages.u64(1 << 20 | MigrationFormat.zeroPageFlag)
        guard case .corruptFrame = try destinationError(sending: MigrationFormat.preamble() + frame(1, offer) + frame(4, pages.bytes)) else {
            Issue.record("a page outside RAM is corruptFrame"); return
        }
    }

    @Test func sourceResumesWhenTheDestinationSpeaksAnotherVersion() throws {
        let source = try IntegrityGuest(engine: .software)
        source.start()
        defer { source.stop() }
        #expect(waitForMoreMarkers(source.output, 2))
        let area = try #require(Integrity.area(source.output.text))
        let fake = try MigrationListeningSocket(address: .tcp(host: "127.0.0.1", port: 0))
        defer { fake.close() }
        let server = HostThread(name: "fake-destination") {
            guard let c = fake.accept(timeoutSeconds: 3) else { return }
            try? c.send(MigrationFormat.preamble(version: 7))
            _ = try? c.receive(1 << 20, expecting: "nothing")
        }
        #expect(throws: MigrationError.unsupportedVersion(found: 7, supported: MigrationFormat.version)) {
            try source.machine.migrate(to: fake.address, options: Self.options)
        }
        server.join()
        try expectSourceRunsOn(source, area, "wrong-version destination")
    }

    @Test func destinationTooSmallAndBusyDestinationRefuse() throws {
        let source = try IntegrityGuest(engine: .software)
        source.start()
        defer { source.stop() }
        #expect(waitForMoreMarkers(source.output, 2))
        let area = try #require(Integrity.area(source.output.text))

        let small = try destination(memoryLimit: 16 << 20)
        let smallReceiver = Receiver(small)
        do {
            _ = try source.machine.migrate(to: small.address, options: Self.options)
            Issue.record("a 16 MiB destination took a 32 MiB machine")
        } catch let MigrationError.rejected(reason, message) {
            #expect(reason == .memoryTooSmall)
            #expect(message.contains("16M"))
        }
        #expect(throws: MigrationError.self) { try smallReceiver.join().get() }
        small.close()
        try expectSourceRunsOn(source, area, "destination too small")

        // Busy: another source holds the destination (it sent its preamble and stalls).
        let incoming = try destination()
        defer { incoming.close() }
        let holder = Receiver(incoming)
        let stalled = try MigrationConnection.connect(to: incoming.address, timeoutSeconds: 3)
        try stalled.send(MigrationFormat.preamble())
        _ = try stalled.receive(MigrationFormat.preambleSize, expecting: "the destination's preamble")
        do {
            _ = try source.machine.migrate(to: incoming.address, options: Self.options)
            Issue.record("a busy destination took a second machine")
        } catch let MigrationError.rejected(reason, _) {
            #expect(reason == .busy)
        }
        try expectSourceRunsOn(source, area, "busy destination")
        stalled.shutdownNow()
        #expect(throws: MigrationError.self) { try holder.join().get() }
        // Free again: the migration goes through.
        let receiver = Receiver(incoming)
        _ = try source.machine.migrate(to: incoming.address, options: Self.options)
        let (machine, _) = try receiver.join().get()
        #expect(try Integrity.check(machine.memory, base: area.base, pages: area.pages) == nil)
    }
}
