import CHost
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import VirtCore

/// The stream paths of live migration and snapshots, measured without a guest: the same
/// channel, page codec and transport a migration uses, between two threads of this process
/// over a real socket, and the snapshot writer onto a file. RAM is filled with data that is
/// neither zero nor repeated, so every page travels whole.
public enum StreamBenchmark {
    public struct Measurement: Codable, Sendable {
        public var what: String
        public var bytes: UInt64
        public var seconds: Double
        public var bytesPerSecond: Double
        /// CPU time of this process (all threads, user + system) over the same span: what
        /// the work costs whatever else the host runs.
        public var cpuSeconds: Double
        /// With a preallocated destination: how long allocating its RAM took beforehand
        /// (the host's page allocation rate, which bounds a stream into fresh RAM).
        public var destinationAllocationSeconds: Double?
    }

    static func processCPUSeconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        func s(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
        return s(usage.ru_utime) + s(usage.ru_stime)
    }

    /// Whether CRC-32C runs on the CPU's crc32 instruction here (SSE4.2).
    public static var checksumInHardware: Bool { host_crc32c_is_hardware() != 0 }

    /// Fills every page of `memory` with distinct non-zero words.
    static func fill(_ memory: GuestMemory) {
        let words = memory.base.assumingMemoryBound(to: UInt64.self)
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        for i in 0..<Int(memory.size) / 8 {
            x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            words[i] = x | 1
        }
    }

    /// Sends all of a `bytes`-sized RAM as page frames over `address` (TCP on loopback, or a
    /// Unix socket) to a receiver thread that places them in a second RAM, and checks that
    /// both RAMs are equal afterwards. Timed from the first frame to the receiver's
    /// acknowledgement of the last. `preallocatedDestination`: the second RAM is allocated
    /// before the clock starts (`run --incoming --prealloc`), so the figure is the stream's
    /// own rate; otherwise every arriving page also costs the host a page allocation.
    public static func migrationStream(bytes: UInt64, over address: MigrationAddress,
                                       preallocatedDestination: Bool) throws -> Measurement {
        let source = try GuestMemory(size: bytes, name: "bench-source")
        let destination = try GuestMemory(size: bytes, name: "bench-destination")
        fill(source)
        var allocationSeconds: Double?
        if preallocatedDestination {
            let start = ContinuousClock.now
            try destination.preallocate()
            allocationSeconds = (ContinuousClock.now - start).seconds
        }
        let listener = try MigrationListeningSocket(address: address)
        defer { listener.close() }
        let pageCount = Int(bytes) / MigrationFormat.pageSize
        let receiverFailure = Mutex<String?>(nil)
        let receiver = HostThread(name: "bench-receive") {
            guard let connection = listener.accept(timeoutSeconds: 30) else { receiverFailure.withLock { $0 = "no connection" }; return }
            let channel = MigrationChannel(connection: connection)
            var written = DirtyBitmap(pageCount: pageCount)
            do throws(MigrationError) {
                while true {
                    let frame = try channel.receive(expecting: "pages")
                    if frame.kind == .complete { break }
                    _ = try MigrationPageCodec.decode(frame.payload, into: destination, written: &written,
                                                                     preallocated: preallocatedDestination)
                }
                try channel.send(.confirm, [])
            } catch {
                receiverFailure.withLock { $0 = "\(error)" }
            }
        }
        let clock = ContinuousClock()
        let cpuBefore = processCPUSeconds()
        let started = clock.now
        do {
            let channel = MigrationChannel(connection: try MigrationConnection.connect(to: listener.address, timeoutSeconds: 30))
            var page = 0
            while page < pageCount {
                let batch = page..<min(page + MigrationFormat.pagesPerFrame, pageCount)
                try channel.queue(.pages) { _ = MigrationPageCodec.encode(pages: batch, of: source, allocated: nil, into: &$0) }
                page = batch.upperBound
            }
            try channel.send(.complete, [])
            _ = try channel.receive(.confirm)
        } catch {
            receiver.join()
            throw error
        }
        let elapsed = clock.now - started
        let cpu = processCPUSeconds() - cpuBefore
        receiver.join()
        if let failure = receiverFailure.withLock({ $0 }) { throw MigrationError.peerFailed("the benchmark's receiver: \(failure)") }
        guard memcmp(source.base, destination.base, Int(bytes)) == 0 else {
            throw MigrationError.restoreFailed("the benchmark's destination RAM differs from the source's")
        }
        let seconds = elapsed.seconds
        return Measurement(what: "migration stream over \(address.kindName)", bytes: bytes, seconds: seconds,
                           bytesPerSecond: Double(bytes) / seconds, cpuSeconds: cpu,
                           destinationAllocationSeconds: allocationSeconds)
    }

    /// Writes a `bytes`-sized RAM as a snapshot file in `directory` (e.g. a tmpfs), fsync and
    /// rename included, then removes it.
    public static func snapshotWrite(bytes: UInt64, directory: String) throws -> Measurement {
        let memory = try GuestMemory(size: bytes, name: "bench-snapshot")
        fill(memory)
        let path = directory + "/swiftvisor-bench-\(getpid()).snap"
        defer { unlink(path) }
        let metadata = SnapshotMetadata(engine: "benchmark", memorySize: bytes, vcpuCount: 0, note: "stream benchmark")
        let cpuBefore = processCPUSeconds()
        let report = try SnapshotWriter.writeChunks(to: path, metadata: metadata, vcpus: [], devices: [],
                                                    pageCount: Int(bytes) / SnapshotFormat.pageSize) { pages, buffer in
            buffer.copyMemory(from: UnsafeRawBufferPointer(start: memory.base + pages.lowerBound * SnapshotFormat.pageSize, count: buffer.count))
        }
        return Measurement(what: "snapshot file in \(directory)", bytes: report.bytesWritten, seconds: report.seconds,
                           bytesPerSecond: report.bytesPerSecond, cpuSeconds: processCPUSeconds() - cpuBefore,
                           destinationAllocationSeconds: nil)
    }
}

extension StreamBenchmark {
    /// A copy-on-write snapshot of a running `bytes`-sized machine into `directory`: the
    /// `counter` guest runs (and writes) while RAM above its first 64 MiB holds data the
    /// host wrote before the boot, so nearly all of it goes to the file. Returns the
    /// measurement (wall time from the pause to the renamed file) and the pause.
    public static func machineSnapshot(bytes: UInt64, engine: any Engine, directory: String) throws -> (Measurement, pauseSeconds: Double) {
        let guestRAM: UInt64 = 64 << 20
        guard bytes > guestRAM else { throw MigrationError.notMigratable("the snapshot row needs more than 64 MiB of RAM") }
        let output = Mutex<[UInt8]>([])
        let machine = try Machine(image: try GuestProgram.load("counter"),
                                  configuration: MachineConfiguration(memorySize: bytes, commandLine: "work=200000 touch=4",
                                                                      timeoutSeconds: 600, guestName: "counter"),
                                  engine: engine, serialOutput: { b in output.withLock { $0.append(b) } })
        let words = (machine.memory.base + Int(guestRAM)).assumingMemoryBound(to: UInt64.self)
        for i in 0..<Int(bytes - guestRAM) / 8 { words[i] = UInt64(i) &* 0x9E37_79B9_7F4A_7C15 | 1 }
        let runner = HostThread(name: "bench-guest") { _ = try? machine.run() }
        defer { machine.stop(); runner.join() }
        let deadline = ContinuousClock.now + .seconds(60)
        while output.withLock({ $0.filter { $0 == UInt8(ascii: "\n") }.count }) < 2 {
            guard ContinuousClock.now < deadline else { throw MigrationError.timedOut(expecting: "the benchmark guest's first lines") }
            usleep(1000)
        }
        let path = directory + "/swiftvisor-bench-machine-\(getpid()).snap"
        defer { unlink(path) }
        let cpuBefore = processCPUSeconds()
        let report = try machine.snapshot(to: path, note: "benchmark")
        let measurement = Measurement(what: "machine snapshot in \(directory)", bytes: report.fileBytes, seconds: report.totalSeconds,
                                      bytesPerSecond: Double(report.fileBytes) / report.totalSeconds,
                                      cpuSeconds: processCPUSeconds() - cpuBefore, destinationAllocationSeconds: nil)
        return (measurement, report.pauseSeconds)
    }
}

extension MigrationAddress {
    var kindName: String {
        switch self {
        case .tcp: return "TCP loopback"
        case .unix: return "a Unix socket"
        }
    }
}
