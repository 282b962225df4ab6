import Foundation
import GuestImages
import Synchronization
import OperatorAPI
import Testing
import TestSupport
import VirtCore
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// A machine running the `migration-integrity` guest (QEMU's migration test): it increments
/// the first byte of each page of an area, pass after pass, printing "pass P" every few passes.
final class IntegrityGuest: @unchecked Sendable {
    // SAFETY: `machine` is set once before the runner starts; the rest is synchronised.
    let machine: Machine
    let output: SerialCapture
    let result = Mutex<RunResult?>(nil)
    private var runner: HostThread?
    static let every: UInt64 = 32

    init(engine: EngineChoice, memory: UInt64 = 32 << 20, pages: Int = 1024, spin: Int = 0) throws {
        let guest = try #require(BundledGuests.named("migration-integrity"))
        let output = SerialCapture()
        self.output = output
        machine = try Machine(image: try ELFImage(bytes: guest.elf),
                              configuration: MachineConfiguration(memorySize: memory, commandLine: "pages=\(pages) every=\(Self.every) spin=\(spin)",
                                                                  timeoutSeconds: 60, guestName: "migration-integrity"),
                              engine: try TestEngines.make(engine), serialOutput: output.append)
    }

    /// Wraps a machine that arrived by migration; `output` is where its serial port writes.
    init(arrived machine: Machine, output: SerialCapture) {
        self.machine = machine
        self.output = output
    }

    func start() {
        runner = HostThread(name: "integrity") { [self] in
            let r = try? machine.run()
            result.withLock { $0 = r }
        }
    }

    /// Waits for the run to end (after a migration or a stop).
    func join() -> RunResult? {
        runner?.join()
        runner = nil
        return result.withLock { $0 }
    }

    func stop() { machine.stop(); _ = join() }

    deinit { machine.stop(); runner?.join() }
}

enum Integrity {
    /// The area's address and size, from the guest's first line.
    static func area(_ text: String) -> (base: UInt64, pages: Int)? {
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("integrity area 0x") }) else { return nil }
        let words = line.split(separator: " ")
        guard words.count == 5, let base = UInt64(words[2].dropFirst(2), radix: 16), let pages = Int(words[4]) else { return nil }
        return (base, pages)
    }

    /// The pass numbers of every complete "pass P" line.
    static func passes(_ text: String) -> [UInt64] {
        text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().compactMap {
            $0.hasPrefix("pass ") ? UInt64($0.dropFirst(5)) : nil
        }
    }

    /// Nil when the first bytes of the area's pages hold one value, or two with one
    /// boundary where the next value starts (the pass in progress); else what is wrong.
    static func check(_ memory: GuestMemory, base: UInt64, pages: Int) throws -> String? {
        var values: [UInt8] = []
        for p in 0..<pages { values.append(try memory.load(UInt8.self, at: base + UInt64(p) * 4096)) }
        var boundaries: [Int] = []
        for i in 1..<values.count where values[i] != values[i - 1] {
            guard values[i] &+ 1 == values[i - 1] else { return "page \(i) holds \(values[i]) after \(values[i - 1])" }
            boundaries.append(i)
        }
        return boundaries.count <= 1 ? nil : "\(boundaries.count) boundaries, at pages \(boundaries.prefix(8))"
    }

    /// Markers strictly consecutive (every `IntegrityGuest.every` passes), no gap or repeat.
    static func consecutive(_ passes: [UInt64]) -> Bool {
        zip(passes, passes.dropFirst()).allSatisfy { $1 == $0 + IntegrityGuest.every }
    }
}

/// Waits for `count` more markers than `text` had at the call.
func waitForMoreMarkers(_ capture: SerialCapture, _ count: Int = 2, seconds: Double = 20) -> Bool {
    let start = Integrity.passes(capture.text).count
    return waitUntil(seconds: seconds) { Integrity.passes(capture.text).count >= start + count }
}

/// One destination attempt on its own thread.
final class Receiver: @unchecked Sendable {
    // SAFETY: `outcome` is written by the thread and read after join().
    let output = SerialCapture()
    private var outcome: Result<(Machine, IncomingMigrationReport), any Error>?
    private var thread: HostThread?

    init(_ incoming: IncomingMigration) {
        thread = HostThread(name: "receiver") { [self, output] in
            // Bounded, so a source that never arrives fails the test instead of hanging it.
            outcome = Result { try incoming.receiveOne(serialOutput: output.append, waitSeconds: 60) }
        }
    }

    func join() -> Result<(Machine, IncomingMigrationReport), any Error> {
        thread?.join()
        thread = nil
        return outcome!
    }
}

let migrationTimeouts: MigrationOptions = try! MigrationOptions(maxDowntimeMilliseconds: 50, maxRounds: 3, timeoutSeconds: 5)

/// RAM of source and destination identical, but for the hypercall fields of boot info a
/// destination on another engine rewrites.
func ramDifference(_ a: GuestMemory, _ b: GuestMemory) throws -> Int? {
    guard a.size == b.size else { return 0 }
    let skip = (BootLayout.bootInfoAddress + 20)..<(BootLayout.bootInfoAddress + 26)
    return try a.withBytes(at: 0, count: Int(a.size)) { x in
        try b.withBytes(at: 0, count: Int(b.size)) { y in
            if memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0 { return nil }
            for i in 0..<x.count where x[i] != y[i] && !skip.contains(UInt64(i)) { return i }
            return nil
        }
    }
}

@Suite struct MigrationTests {
    /// Migrates `source` (running) to a fresh destination on `engine`; checks RAM equality at
    /// the switch-over, the integrity pattern, and that markers continue there.
    /// `preallocate`: the destination allocates that much RAM while it waits.
    func migrate(_ source: IntegrityGuest, to engine: EngineChoice, over address: MigrationAddress,
                 area: (base: UInt64, pages: Int), preallocate: UInt64? = nil) throws -> IntegrityGuest {
        var options = IncomingMigrationOptions(engine: try TestEngines.make(engine))
        options.preallocateBytes = preallocate
        let incoming = try IncomingMigration(listeningOn: address, options: options)
        defer { incoming.close() }
        let receiver = Receiver(incoming)
        let report = try source.machine.migrate(to: incoming.address, options: migrationTimeouts)
        let (machine, arrived) = try receiver.join().get()
        #expect(arrived.intoPreallocatedMemory == (preallocate == source.machine.memory.size))
        #expect(report.destinationEngine == engine.rawValue)
        #expect(arrived.pagesReceived == report.pagesSent)
        #expect(source.join()?.stopReason == .migrated(destination: incoming.address.description))
        // Both halves hold the same RAM at the switch-over point.
        #expect(try ramDifference(source.machine.memory, machine.memory) == nil)
        #expect(try Integrity.check(machine.memory, base: area.base, pages: area.pages) == nil)
        let destination = IntegrityGuest(arrived: machine, output: receiver.output)
        destination.start()
        #expect(waitForMoreMarkers(receiver.output, 3), "the guest runs on at the destination")
        return destination
    }

    func startSource(_ engine: EngineChoice) throws -> IntegrityGuest {
        let g = try IntegrityGuest(engine: engine)
        g.start()
        #expect(waitForMoreMarkers(g.output, 3))
        return g
    }

    @Test(arguments: TestEngines.available)
    func eachEngineMigratesToItselfOverTCPAndUnixSockets(engine: EngineChoice) throws {
        let source = try startSource(engine)
        let area = try #require(Integrity.area(source.output.text))
        let middle = try migrate(source, to: engine, over: .tcp(host: "127.0.0.1", port: 0), area: area)
        let path = temporaryPath("mig") + ".sock"
        let last = try migrate(middle, to: engine, over: .unix(path: path), area: area)
        defer { last.stop() }
        last.machine.pause()
        #expect(try Integrity.check(last.machine.memory, base: area.base, pages: area.pages) == nil)
        last.machine.resume()
        let all = source.output.text + middle.output.text + last.output.text
        #expect(Integrity.consecutive(Integrity.passes(all)), "markers continue without a gap or repeat")
    }

    /// A destination that preallocated RAM of the offered size streams into it; one that
    /// preallocated another size allocates as the pages come. Both arrive intact.
    @Test(arguments: TestEngines.available)
    func aPreallocatedDestinationTakesAPrecopyOfItsSize(engine: EngineChoice) throws {
        let source = try startSource(engine)
        let area = try #require(Integrity.area(source.output.text))
        let size = source.machine.memory.size
        let middle = try migrate(source, to: engine, over: .tcp(host: "127.0.0.1", port: 0), area: area, preallocate: size)
        let last = try migrate(middle, to: engine, over: .tcp(host: "127.0.0.1", port: 0), area: area, preallocate: size * 2)
        last.stop()
        #expect(Integrity.consecutive(Integrity.passes(source.output.text + middle.output.text + last.output.text)))
    }

    @Test(.enabled(if: kvmUsable, Comment(rawValue: noKVM)))
    func kvmToSoftwareToKVM() throws {
        let source = try startSource(.kvm)
        let area = try #require(Integrity.area(source.output.text))
        let software = try migrate(source, to: .software, over: .tcp(host: "127.0.0.1", port: 0), area: area)
        let back = try migrate(software, to: .kvm, over: .tcp(host: "127.0.0.1", port: 0), area: area)
        defer { back.stop() }
        let all = source.output.text + software.output.text + back.output.text
        let passes = Integrity.passes(all)
        #expect(Integrity.consecutive(passes), "markers continue without a gap or repeat: \(passes.suffix(12))")
        #expect(back.machine.engine.name == "kvm")
    }
}

@Suite struct HostWriteTrackingTests {
    @Test func hostWritesThroughGuestMemoryAreLoggedOnlyWhileEnabled() throws {
        let memory = try GuestMemory(size: 4 << 20)
        try memory.store(UInt32(1), at: 0x1000)
        memory.hostWrites.setEnabled(true)
        #expect(memory.hostWrites.collect().isEmpty, "enabling starts from a clear log")
        try memory.store(UInt64(7), at: 0x2FFC)            // straddles pages 2 and 3
        try memory.write([1, 2, 3], at: 0x10_0000)
        try memory.fill(0xAA, at: 0x20_0000, count: 8192)  // pages 512, 513
        try memory.discard(gpa: 0x30_0000, length: 4096)
        memory.noteHostWrite(0x5000, length: 1)
        #expect(memory.hostWrites.collect().dirtyPages == [2, 3, 5, 256, 512, 513, 768])
        #expect(memory.hostWrites.collect().isEmpty, "collecting clears")
        memory.hostWrites.setEnabled(false)
        try memory.store(UInt8(1), at: 0)
        #expect(memory.hostWrites.collect().isEmpty)
    }

    /// Device DMA goes through GuestMemory from host threads, which neither KVM's dirty log
    /// nor the software engine's second-level flags see: a page only a "device" writes during
    /// pre-copy must still arrive with its last contents.
    @Test(arguments: TestEngines.available)
    func pagesWrittenByTheHostDuringPrecopyArrive(engine: EngineChoice) throws {
        let source = try IntegrityGuest(engine: engine)
        source.start()
        #expect(waitForMoreMarkers(source.output, 2))
        let incoming = try IncomingMigration(listeningOn: .tcp(host: "127.0.0.1", port: 0),
                                             options: IncomingMigrationOptions(engine: try TestEngines.make(engine)))
        defer { incoming.close() }
        let receiver = Receiver(incoming)
        // A page above the guest's image and area, written by the host in every round.
        let dmaPage: UInt64 = 24 << 20
        let writes = Mutex<UInt64>(0)
        // No downtime allowance: the guest always dirties its area, so all three rounds run.
        let options = try MigrationOptions(maxDowntimeMilliseconds: 0, maxRounds: 3, timeoutSeconds: 5)
        _ = try source.machine.migrate(to: incoming.address, options: options) { progress in
            guard progress.phase == .bulk || progress.phase == .dirtyRound else { return }  // devices are frozen after
            let n = writes.withLock { $0 += 1; return $0 }
            try? source.machine.memory.write(Array(repeating: UInt8(truncatingIfNeeded: n), count: 4096), at: dmaPage)
        }
        let (machine, _) = try receiver.join().get()
        defer { machine.stop() }
        let last = UInt8(truncatingIfNeeded: writes.withLock { $0 })
        #expect(last == 4, "written before the bulk pass and before each of the 3 rounds")
        #expect(try machine.memory.read(at: dmaPage, count: 4096) == Array(repeating: last, count: 4096))
        #expect(try ramDifference(source.machine.memory, machine.memory) == nil)
    }
}

/// A source's `migrate` on its own thread (post-copy returns only once every page is pushed,
/// while the destination's guest already runs).
final class Migration: @unchecked Sendable {
    // SAFETY: `outcome` is written by the thread and read after join().
    private var outcome: Result<MigrationReport, any Error>?
    private var thread: HostThread?

    init(_ machine: Machine, to address: MigrationAddress, options: MigrationOptions) {
        thread = HostThread(name: "migrate") { [self] in
            outcome = Result { try machine.migrate(to: address, options: options) }
        }
    }

    func join() -> Result<MigrationReport, any Error> {
        thread?.join()
        thread = nil
        return outcome!
    }
}

@Suite struct PostcopyTests {
    static let options = try! MigrationOptions(maxDowntimeMilliseconds: 50, timeoutSeconds: 3, postcopy: true)

    func destination(_ engine: EngineChoice, recoverySeconds: Double = 0, preallocate: UInt64? = nil) throws -> IncomingMigration {
        var options = IncomingMigrationOptions(engine: try TestEngines.make(engine))
        options.timeoutSeconds = 3
        options.preallocateBytes = preallocate
        options.postcopyRecoverySeconds = recoverySeconds
        return try IncomingMigration(listeningOn: .tcp(host: "127.0.0.1", port: 0), options: options)
    }

    /// Post-copy: the guest runs at the destination before its pages are there (its 16 MiB
    /// area is swept faster than it is pushed, so it faults on pages still at the source);
    /// every page arrives, the area holds one boundary, markers continue.
    /// `preallocatingDestination`: the destination had preallocated RAM of the guest's size,
    /// which post-copy must not use (its missing pages must be missing).
    func postcopy(from sourceEngine: EngineChoice, to engine: EngineChoice, preallocatingDestination: Bool = false) throws {
        let source = try IntegrityGuest(engine: sourceEngine, pages: 4096)
        source.start()
        #expect(waitForMoreMarkers(source.output, 3))
        let area = try #require(Integrity.area(source.output.text))
        let incoming = try destination(engine, preallocate: preallocatingDestination ? source.machine.memory.size : nil)
        defer { incoming.close() }
        let receiver = Receiver(incoming)
        let migration = Migration(source.machine, to: incoming.address, options: Self.options)
        let (machine, arrived) = try receiver.join().get()
        #expect(!arrived.intoPreallocatedMemory)
        let destination = IntegrityGuest(arrived: machine, output: receiver.output)
        destination.start()
        defer { destination.stop() }
        let report = try migration.join().get()
        #expect(source.join()?.stopReason == .migrated(destination: incoming.address.description))
        let statistics = try #require(report.postcopy)
        #expect(statistics.pagesReceived == Int(machine.memory.size / 4096), "every page arrived")
        #expect(statistics.remoteFaults > 0, "the guest ran before its pages were pushed")
        try expectArrivedIntact(machine, area: area, source: source, receiver: receiver)
    }

    /// Every page is in at the destination, its integrity area holds one boundary, and the
    /// markers go on there without a gap or repeat.
    func expectArrivedIntact(_ machine: Machine, area: (base: UInt64, pages: Int), source: IntegrityGuest, receiver: Receiver) throws {
        #expect(machine.postcopyFinished)
        #expect(waitForMoreMarkers(receiver.output, 3), "the guest runs on at the destination")
        machine.pause()
        #expect(try Integrity.check(machine.memory, base: area.base, pages: area.pages) == nil)
        machine.resume()
        let passes = Integrity.passes(source.output.text + receiver.output.text)
        #expect(Integrity.consecutive(passes), "markers continue without a gap or repeat: \(passes.suffix(8))")
    }

    @Test(arguments: TestEngines.available)
    func postcopyToTheSameEngine(engine: EngineChoice) throws { try postcopy(from: engine, to: engine) }

    @Test func postcopyIgnoresADestinationsPreallocatedRAM() throws {
        try postcopy(from: .software, to: .software, preallocatingDestination: true)
    }

    @Test(.enabled(if: kvmUsable, Comment(rawValue: noKVM)))
    func postcopyKVMToSoftware() throws { try postcopy(from: .kvm, to: .software) }

    @Test func postcopyCutBeforeTheConfirmationResumesTheSource() throws {
        let source = try IntegrityGuest(engine: .software)
        source.start()
        defer { source.stop() }
        #expect(waitForMoreMarkers(source.output, 2))
        let area = try #require(Integrity.area(source.output.text))
        let incoming = try destination(.software)
        defer { incoming.close() }
        // Cuts inside the offer, the state and the first-MiB frames, which precede the confirmation.
        for cut in [100, 700, 2000, 8000] {
            let relay = try FaultyRelay(to: incoming.address, cutAfter: cut)
            let receiver = Receiver(incoming)
            #expect(throws: MigrationError.self) { try source.machine.migrate(to: relay.address, options: Self.options) }
            relay.finish()
            #expect(throws: MigrationError.self) { try receiver.join().get() }
            #expect(source.result.withLock { $0 } == nil)
            #expect(waitForMoreMarkers(source.output, 1), "the guest continues at the source after a cut at \(cut)")
            source.machine.pause()
            #expect(try Integrity.check(source.machine.memory, base: area.base, pages: area.pages) == nil)
            source.machine.resume()
        }
    }

    /// A cut after the switch-over at a destination that does not wait for a resume: the
    /// source reports it and keeps every page (its machine stays stopped), the destination's
    /// guest stops with the reason instead of running on with holes.
    @Test func postcopyCutAfterTheSwitchOverStopsTheDestinationAndKeepsTheSourcesPages() throws {
        let source = try IntegrityGuest(engine: .software, pages: 4096)
        source.start()
        #expect(waitForMoreMarkers(source.output, 2))
        let incoming = try destination(.software)
        defer { incoming.close() }
        let relay = try FaultyRelay(to: incoming.address, cutAfter: 4 << 20)
        let receiver = Receiver(incoming)
        let migration = Migration(source.machine, to: relay.address, options: Self.options)
        let (machine, _) = try receiver.join().get()
        let destination = IntegrityGuest(arrived: machine, output: receiver.output)
        destination.start()
        guard case let .failure(error) = migration.join(), case let .postcopyInterrupted(delivered, count, _) = error as? MigrationError else {
            Issue.record("the source reports an interrupted post-copy"); return
        }
        #expect(delivered < count)
        relay.finish()
        guard case let .engineFailure(_, .postcopy(reason)) = destination.join()?.stopReason else {
            Issue.record("the destination's guest stops with the reason"); return
        }
        #expect(reason.contains("the source keeps the missing pages"))
        #expect(source.join()?.stopReason == .migrated(destination: relay.address.description))
        #expect(!machine.postcopyFinished)
        let area = try #require(Integrity.area(source.output.text))
        #expect(try Integrity.check(source.machine.memory, base: area.base, pages: area.pages) == nil, "the source's RAM is intact")
    }
}

extension PostcopyTests {
    /// Post-copy recovery (QEMU's `migrate -r`): the stream is cut after the switch-over; the
    /// destination's guest waits on its missing pages, the source keeps them, and a resume
    /// to the destination's address finishes the migration: every page arrives, the area
    /// holds one boundary, the markers go on without a gap.
    @Test(arguments: [EngineChoice.software] + (kvmUsable ? [.kvm] : []))
    func postcopyCutAfterTheSwitchOverIsResumed(engine: EngineChoice) throws {
        let source = try IntegrityGuest(engine: engine, pages: 4096)
        source.start()
        #expect(waitForMoreMarkers(source.output, 2))
        let area = try #require(Integrity.area(source.output.text))
        let incoming = try destination(engine, recoverySeconds: 60)
        defer { incoming.close() }
        let relay = try FaultyRelay(to: incoming.address, cutAfter: 4 << 20)
        let receiver = Receiver(incoming)
        let migration = Migration(source.machine, to: relay.address, options: Self.options)
        let (machine, _) = try receiver.join().get()
        let destination = IntegrityGuest(arrived: machine, output: receiver.output)
        destination.start()
        defer { destination.stop() }
        let outcome = migration.join()
        guard case .failure(let error) = outcome, case .postcopyInterrupted = error as? MigrationError else {
            Issue.record("the source reports an interrupted post-copy, not \(outcome)"); return
        }
        relay.finish()
        #expect(source.machine.awaitsPostcopyRecovery)
        #expect(!machine.postcopyFinished)
        #expect(destination.result.withLock { $0 } == nil, "the destination's guest waits, it does not stop")
        var options = Self.options
        options.resume = true
        let report = try source.machine.migrate(to: incoming.address, options: options)
        #expect(!source.machine.awaitsPostcopyRecovery)
        let statistics = try #require(report.postcopy)
        #expect(statistics.pagesReceived == Int(machine.memory.size / 4096), "every page arrived")
        try expectArrivedIntact(machine, area: area, source: source, receiver: receiver)
    }

    /// A resuming offer where no broken post-copy migration waits is refused, and a machine
    /// with nothing to resume says so.
    @Test func resumeWithNothingToResumeIsRefused() throws {
        let source = try IntegrityGuest(engine: .software, pages: 64)
        source.start()
        defer { source.stop() }
        #expect(waitForMoreMarkers(source.output, 1))
        var options = Self.options
        options.resume = true
        let incoming = try destination(.software)
        defer { incoming.close() }
        #expect(throws: MigrationError.notMigratable("no interrupted post-copy migration to resume")) {
            try source.machine.migrate(to: incoming.address, options: options)
        }
    }
}

@Suite struct MigrationControlTests {
    /// The operator API's `PUT /migrate`: progress lines, then the report; the machine
    /// arrives at the destination and the source stops as migrated.
    @Test func migrateRequestStreamsProgressThenTheReport() throws {
        let source = try IntegrityGuest(engine: .software)
        source.start()
        #expect(waitForMoreMarkers(source.output, 2))
        let path = temporaryPath("api") + ".sock"
        let server = try APIServer(endpoint: .unix(path: path), router: APIRouter(controller: VMController(running: source.machine)))
        defer { server.close() }
        let incoming = try IncomingMigration(listeningOn: .unix(path: temporaryPath("in") + ".sock"),
                                             options: IncomingMigrationOptions(engine: try TestEngines.make(.software)))
        defer { incoming.close() }
        let receiver = Receiver(incoming)
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        var lines: [MigrationControlLine] = []
        let client = APIClient(socketPath: path)
        let answer = try client.stream("PUT", "/migrate", json: MigrateRequest(destination: incoming.address.description, maxDowntimeMs: 50, maxRounds: 2)) {
            lines.append(try! decoder.decode(MigrationControlLine.self, from: Data($0.utf8)))
        }
        #expect(answer.status == 200)
        #expect(answer.headers.contains { $0.name == "transfer-encoding" && $0.value == "chunked" })
        let (machine, _) = try receiver.join().get()
        defer { machine.stop() }
        #expect(lines.first?.progress?.phase == .bulk)
        #expect(lines.contains { $0.progress?.phase == .stopAndCopy })
        let last = try #require(lines.last)
        #expect(last.ok == true && last.report?.destination == incoming.address.description)
        #expect(lines.dropLast().allSatisfy { !$0.isFinal })
        #expect(source.join()?.stopReason == .migrated(destination: incoming.address.description))

        let bad = try client.send("PUT", "/migrate", json: MigrateRequest(destination: "nowhere"))
        #expect(bad.status == 400 && bad.faultMessage.contains("is not tcp:HOST:PORT"))
    }
}

@Suite struct AutoConvergeTests {
    /// Auto-converge holds a guest that keeps the rounds from converging paused for a growing
    /// share of each round (50 %, 75 %, 87.5 % …) and loses nothing doing it: the guest is
    /// paused and resumed frame by frame while its pages go. (Whether that makes a given guest
    /// converge depends on its dirty rate and the bandwidth: a lab question, not a test's.)
    @Test func throttleGrowsEachRoundAndLosesNothing() throws {
        let source = try IntegrityGuest(engine: .software, pages: 1024, spin: 2000)
        source.start()
        #expect(waitForMoreMarkers(source.output, 2))
        let area = try #require(Integrity.area(source.output.text))
        let incoming = try IncomingMigration(listeningOn: .tcp(host: "127.0.0.1", port: 0),
                                             options: IncomingMigrationOptions(engine: try TestEngines.make(.software)))
        defer { incoming.close() }
        let receiver = Receiver(incoming)
        // No downtime allowance: rounds run to the limit while the guest dirties pages.
        let options = try MigrationOptions(maxDowntimeMilliseconds: 0, maxRounds: 4, timeoutSeconds: 5, autoConverge: true)
        let report = try source.machine.migrate(to: incoming.address, options: options)
        let (machine, _) = try receiver.join().get()
        // Every round runs unless the guest, throttled, dirtied nothing in one (a fast host,
        // or one so loaded that the held guest hardly ran): then nothing is left and the
        // migration rightly stops early.
        // Round 0 is the bulk pass: a guest starved by the host may have dirtied nothing in it.
        #expect(report.rounds >= 0 && report.rounds <= 4)
        #expect(report.rounds == 4 || report.dirtyPagesPerRound.last == 0)
        let expectedThrottle = report.rounds == 0 ? 0 : 1 - 1 / Double(1 << (report.rounds - 1))
        #expect(report.throttle == expectedThrottle, "none before round 2, 50 % after round 1, then halving what runs: 75 %, 87.5 %")
        // Compared before the destination runs: from then on its guest changes its RAM.
        #expect(try ramDifference(source.machine.memory, machine.memory) == nil)
        #expect(try Integrity.check(machine.memory, base: area.base, pages: area.pages) == nil)
        let destination = IntegrityGuest(arrived: machine, output: receiver.output)
        destination.start()
        defer { destination.stop() }
        #expect(waitForMoreMarkers(receiver.output, 2))
    }
}
