import Foundation
import Testing
import TestSupport

@Suite struct CLIMigrationTests {
    /// What a user does in two terminals: `run --incoming` waits, `run counter --control`
    /// counts, `migrate` moves it; the count goes on at the destination without a gap or a
    /// repeat, to its limit, and both processes exit 0.
    @Test(arguments: ["pre-copy", "post-copy"])
    func counterContinuesAtTheDestination(strategy: String) throws {
        let sourceEngine = kvmUsable ? "kvm" : "software"
        let tag = "\(getpid())-\(strategy)"
        let control = NSTemporaryDirectory() + "swiftvisor-cli-mig-\(tag).sock"
        let incoming = NSTemporaryDirectory() + "swiftvisor-cli-in-\(tag).sock"
        defer { unlink(control); unlink(incoming) }

        let destination = Process()
        destination.executableURL = URL(fileURLWithPath: swiftvisorPath)
        destination.arguments = ["run", "counter", "--incoming", "unix:\(incoming)", "--engine", "software", "--timeout", "60",
                                 "--memory", "64M", "--prealloc"]
        let destinationOut = Pipe(), destinationErr = Pipe()
        destination.standardOutput = destinationOut
        destination.standardError = destinationErr
        try destination.run()
        defer { if destination.isRunning { destination.terminate() } }
        let deadline = Date().addingTimeInterval(20)
        while access(incoming, F_OK) != 0 && Date() < deadline { usleep(10_000) }

        let source = Process()
        source.executableURL = URL(fileURLWithPath: swiftvisorPath)
        source.arguments = ["run", "counter", "--engine", sourceEngine, "--cmdline", "limit=300 work=50000", "--control", control]
        let sourceOut = Pipe(), sourceErr = Pipe()
        source.standardOutput = sourceOut
        source.standardError = sourceErr
        try source.run()
        defer { if source.isRunning { source.terminate() } }
        var seen = Data()
        while !String(decoding: seen, as: UTF8.self).contains("count 20\n") {
            let chunk = sourceOut.fileHandleForReading.readSomeRetrying()
            if chunk.isEmpty { break }
            seen += chunk
        }
        let migrate = try swiftvisor(["migrate", "--socket", control, "unix:\(incoming)"] + (strategy == "post-copy" ? ["--postcopy"] : []))
        #expect(migrate.status == 0, "\(migrate.stderr)")
        #expect(migrate.stderr.contains("migrated to unix:\(incoming) (\(sourceEngine) → software)"))
        let sourceText = String(decoding: seen + sourceOut.fileHandleForReading.readToEndRetrying(), as: UTF8.self)
        source.waitUntilExit()
        let destinationText = String(decoding: destinationOut.fileHandleForReading.readToEndRetrying(), as: UTF8.self)
        destination.waitUntilExit()
        #expect(source.terminationStatus == 0)
        #expect(destination.terminationStatus == 0)
        #expect(String(decoding: sourceErr.fileHandleForReading.readToEndRetrying(), as: UTF8.self).contains("migrated to"))
        let destinationLog = String(decoding: destinationErr.fileHandleForReading.readToEndRetrying(), as: UTF8.self)
        #expect(destinationLog.contains("received 64 MiB from the \(sourceEngine) engine"))
        // Pre-copy streams into the RAM --prealloc made; post-copy needs its pages missing.
        #expect(destinationLog.contains("into preallocated RAM") == (strategy == "pre-copy"), "\(destinationLog)")
        let counts = (sourceText + destinationText).split(separator: "\n").compactMap { $0.hasPrefix("count ") ? Int($0.dropFirst(6)) : nil }
        #expect(counts == Array(1...300), "the count continues without a gap or repeat")
        #expect(!destinationText.isEmpty, "the destination printed the rest")
    }

    @Test func preallocNeedsIncomingAndMemory() throws {
        for arguments in [["run", "counter", "--prealloc", "--memory", "64M"], ["run", "--incoming", "tcp:127.0.0.1:0", "--prealloc"]] {
            let result = try swiftvisor(arguments)
            #expect(result.status == 64, "\(arguments)")
            #expect(result.stderr.contains("--prealloc needs --incoming and --memory"), "\(result.stderr)")
        }
    }
}
