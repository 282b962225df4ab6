import Devices
import TestSupport
import Testing
import VirtCore
@testable import VMM

/// Seeded fuzzing of snapshot files as `Machine(restoring:)` reads them, starting from a
/// real snapshot (the vconsole guest waiting on its virtio console, software engine).
/// SnapshotFileTests covers single flips and truncations of the codec's own fixture; these
/// loops damage a machine's snapshot with several mutations at once and restore it.
@Suite struct SnapshotFuzzTests {
    /// Snapshots vconsole once it waits for a console line; returns the file's bytes.
    static func snapshotOfAWaitingMachine(_ path: String) throws -> [UInt8] {
        let console = SerialCapture()
        let m = try bundledMachine("vconsole", engine: .software, memory: BootLayout.minRAM, timeout: 60, capture: SerialCapture())
        _ = try m.addVirtioConsole { bytes in bytes.forEach(console.append) }
        let runner = HostThread(name: "vconsole") { _ = try? m.run() }
        defer {
            m.stop()
            runner.join()
        }
        try #require(waitUntil { console.text == "Hello through virtio-console!\n" }, "vconsole did not start: \(console.text)")
        _ = try m.snapshot(to: path)
        return fileBytes(path)
    }

    static func restore(_ path: String) throws -> Machine {
        try Machine(restoring: try SnapshotFile(path: path), engine: try TestEngines.make(.software), serialOutput: { _ in })
    }

    /// Any damage the checksums see (anywhere: header, section table, sections, guest RAM)
    /// fails the restore with a SnapshotError; the file is only read.
    @Test func damagedSnapshotsNeverYieldAMachine() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        let good = try Self.snapshotOfAWaitingMachine(path)
        _ = try Self.restore(path)  // the undamaged file restores
        let memory = try #require(try SnapshotFile(path: path).sections.first { $0.kind == .memory })
        let regions = [0..<Int(memory.offset), Int(memory.offset)..<Int(memory.end), Int(memory.end)..<good.count]
        let seed = FuzzBudget.seed(0x5AA9)
        var g = SplitMix64(seed: seed)
        var damaged = 0
        for iteration in 0..<FuzzBudget.iterations(standard: 120) {
            var bytes = good
            for _ in 0..<1 + Int(g.next() % 3) {
                let region = regions[Int(g.next() % UInt64(regions.count))].clamped(to: 0..<bytes.count)
                Mutation.random(&g).apply(to: &bytes, in: region, &g)
            }
            if sameBytes(bytes, good) { continue }
            damaged += 1
            setFileBytes(path, bytes)
            do {
                _ = try Self.restore(path)
                Issue.record("a machine from a damaged snapshot, seed \(seed) iteration \(iteration)")
            } catch {
                #expect(error is SnapshotError, "\(error), seed \(seed) iteration \(iteration)")
            }
            #expect(sameBytes(fileBytes(path), bytes), "restoring changed the file, seed \(seed) iteration \(iteration)")
        }
        #expect(damaged > 0)
    }

    /// Boundary values in the header, section table and sections with every checksum
    /// recomputed, so the decoders and the restore see them: a typed error, or a machine
    /// that is what the file says.
    @Test func resealedFieldOverwritesRestoreOrFailClearly() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        let good = try Self.snapshotOfAWaitingMachine(path)
        let sections = try SnapshotFile(path: path).sections
        let tableOffset = Int(sections.map(\.end).max()!)
        let regions = [0..<60, tableOffset..<tableOffset + 32 * sections.count]
            + sections.filter { $0.kind != .memory && $0.length > 0 }.map { Int($0.offset)..<Int($0.end) }
        let inPlace: [Mutation] = [.flipBit, .boundaryByte, .boundaryWord, .randomBytes]
        let seed = FuzzBudget.seed(0x5EA1)
        var g = SplitMix64(seed: seed)
        var restored = 0, rejected = 0
        for iteration in 0..<FuzzBudget.iterations(standard: 200) {
            var bytes = good
            for _ in 0..<1 + Int(g.next() % 2) {
                let region = regions[Int(g.next() % UInt64(regions.count))]
                inPlace[Int(g.next() % UInt64(inPlace.count))].apply(to: &bytes, in: region, &g)
            }
            reseal(&bytes, sections: sections, tableOffset: tableOffset)
            setFileBytes(path, bytes)
            let context = "seed \(seed) iteration \(iteration)"
            do {
                let file = try SnapshotFile(path: path)
                let m = try Machine(restoring: file, engine: try TestEngines.make(.software), serialOutput: { _ in })
                restored += 1
                #expect(m.memory.size == file.memorySize, "\(context)")
                #expect(m.allVCPUs.count == file.vcpus.count, "\(context)")
            } catch {
                rejected += 1
                #expect(error is SnapshotError || error is MachineSnapshotError || error is MachineError, "\(error), \(context)")
            }
            #expect(sameBytes(fileBytes(path), bytes), "restoring changed the file, \(context)")
        }
        #expect(restored > 0 && rejected > 0, "restored \(restored), rejected \(rejected)")
    }
}
