import Foundation
import Synchronization
import TestSupport
import Testing

/// The `swiftvisor` executable built next to this test bundle.
let swiftvisorPath: String = {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    return URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("swiftvisor").path
}()

struct CLIResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs `swiftvisor args…`, or `launcher + [swiftvisor] + args` when a launcher is given
/// (`executable`: a copy of swiftvisor elsewhere).
func swiftvisor(_ args: [String], stdin: String = "", launcher: [String] = [], executable: String = swiftvisorPath) throws -> CLIResult {
    #expect(FileManager.default.isExecutableFile(atPath: executable), "swiftvisor built at \(executable)")
    let p = Process()
    p.executableURL = URL(fileURLWithPath: launcher.first ?? executable)
    p.arguments = launcher.isEmpty ? args : Array(launcher.dropFirst()) + [executable] + args
    let out = Pipe(), err = Pipe(), input = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = input
    try p.run()
    input.fileHandleForWriting.write(Data(stdin.utf8))
    try input.fileHandleForWriting.close()
    // Read both pipes fully before waiting, so a chatty child cannot block on a full pipe.
    let errData = Mutex(Data())
    let errDone = DispatchSemaphore(value: 0)
    Thread {
        errData.withLock { $0 = err.fileHandleForReading.readToEndRetrying() }
        errDone.signal()
    }.start()
    let outData = out.fileHandleForReading.readToEndRetrying()
    errDone.wait()
    p.waitUntilExit()
    return CLIResult(status: p.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                     stderr: String(decoding: errData.withLock { $0 }, as: UTF8.self))
}

@Suite struct CLIArgumentTests {
    @Test func badMemorySizeIsAUsageError() throws {
        let r = try swiftvisor(["run", "hello", "--memory", "12X"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("Error: The value '12X' is invalid for '--memory <size>'"))
        #expect(r.stderr.contains("Usage: swiftvisor run"))
        #expect(!r.stderr.contains("Fatal error"))
    }

    @Test func hostSaysHowTheSoftwareEngineRunsEvenWithoutKVM() throws {
        let r = try swiftvisor(["host", "--kvm-path", "/nonexistent/kvm"])
        #expect(r.status == 1)
        #expect(r.stdout.hasPrefix("software engine:  "))
        #expect(r.stdout.contains("block translator") || r.stdout.contains("interpreter only"))
        #expect(r.stdout.contains("kvm: unavailable"))
    }

    @Test func noTranslationWithKVMIsAUsageError() throws {
        let r = try swiftvisor(["run", "hello", "--engine", "kvm", "--no-translation"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("--no-translation applies to the software engine"))
    }

    @Test func badVCPUCountIsAUsageError() throws {
        let r = try swiftvisor(["run", "hello", "--vcpus", "0"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("--vcpus must be between 1 and 16"))
    }

    @Test func unknownGuestIsOneClearLine() throws {
        let r = try swiftvisor(["run", "no-such-guest"])
        #expect(r.status == 125)
        #expect(r.stderr.hasPrefix("swiftvisor: error: no bundled guest named 'no-such-guest'"))
        #expect(r.stderr.split(separator: "\n").count == 1)
    }

    @Test func missingKVMFallsBackToSoftwareWithANotice() throws {
        let r = try swiftvisor(["run", "hello", "--kvm-path", "/no/such/kvm"])
        #expect(r.status == 0)
        #expect(r.stdout == "Hello from Swiftvisor! 64 MiB RAM, 1 vCPU\n")
        #expect(r.stderr == "swiftvisor: KVM unavailable (/no/such/kvm does not exist: this host has no KVM (enable virtualization or load the kvm module)); using the software engine\n")
    }

    @Test func missingKVMIsOneClearLineWhenKVMIsAskedFor() throws {
        let r = try swiftvisor(["run", "hello", "--engine", "kvm", "--kvm-path", "/no/such/kvm"])
        #expect(r.status == 125)
        #expect(r.stderr == "swiftvisor: error: /no/such/kvm does not exist: this host has no KVM (enable virtualization or load the kvm module)\n")
    }

    /// As an unprivileged user, where /dev/kvm is root-only (needs root and setpriv to test).
    @Test(.enabled(if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv")
                   && kvmUsable && (try? FileManager.default.attributesOfItem(atPath: "/dev/kvm")[.posixPermissions] as? Int) == 0o600,
                   "needs root, setpriv and a root-only /dev/kvm"))
    func permissionDeniedIsOneClearLine() throws {
        let r = try swiftvisor(["run", "hello", "--engine", "kvm"], launcher: ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
        #expect(r.status == 125)
        #expect(r.stderr == "swiftvisor: error: permission denied opening /dev/kvm: add your user to the 'kvm' group or run as root\n")
    }

    @Test func guestsListsNamesFirst() throws {
        let r = try swiftvisor(["guests"])
        #expect(r.status == 0)
        let names = r.stdout.split(separator: "\n").map { String($0.split(separator: " ").first ?? "") }
        #expect(names == names.sorted())
        #expect(Set(["compute", "disk", "hello", "hybrid", "net-ping", "pio-loop", "smp", "vconsole"]).isSubset(of: names))
        #expect(!names.contains("triple-fault"))  // test guests only with --all
        let all = try swiftvisor(["guests", "--all"])
        #expect(all.stdout.contains("triple-fault"))
    }

    @Test func helpExplainsExitStatuses() throws {
        let r = try swiftvisor(["run", "--help"])
        #expect(r.status == 0)
        #expect(r.stdout.contains("124 on --timeout"))
    }
}

/// `swiftvisor run` on every engine this host has.
@Suite struct CLIRunTests {
    @Test(arguments: CLIDeviceTests.engines)
    func runHelloStreamsTheGreeting(engine: String) throws {
        let r = try swiftvisor(["run", "hello", "--engine", engine])
        #expect(r.status == 0)
        #expect(r.stdout == "Hello from Swiftvisor! 64 MiB RAM, 1 vCPU\n")
        #expect(r.stderr.isEmpty)
    }

    @Test(arguments: CLIDeviceTests.engines)
    func guestExitStatusPassesThrough(engine: String) throws {
        let r = try swiftvisor(["run", "fault", "--engine", engine])
        #expect(r.status == 0x86)
    }

    @Test(arguments: CLIDeviceTests.engines)
    func tripleFaultPrintsTheStateAndFails(engine: String) throws {
        let r = try swiftvisor(["run", "triple-fault", "--engine", engine])
        #expect(r.status == 125)
        #expect(r.stderr.contains("vCPU 0 shut down (triple fault)"))
        #expect(r.stderr.contains("rip="))
    }

    @Test(arguments: CLIDeviceTests.engines)
    func statsTableAndJSON(engine: String) throws {
        let json = NSTemporaryDirectory() + "swiftvisor-stats-\(getpid())-\(engine).json"
        defer { unlink(json) }
        let r = try swiftvisor(["run", "pio-loop", "--cmdline", "count=500", "--stats", "--stats-json", json, "--engine", engine])
        #expect(r.status == 0)
        #expect(r.stderr.contains("port 0x80 (bench-port)"))
        let data = try Data(contentsOf: URL(fileURLWithPath: json))
        let obj = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect(obj["engine"] as? String == engine)
        let exits = try #require(obj["exits"] as? [String: Any])
        let ports = try #require(exits["ports"] as? [String: Any])
        let bench = try #require(ports["0x80"] as? [String: Any])
        #expect(bench["count"] as? Int == 500)
    }

    @Test(arguments: CLIDeviceTests.engines)
    func standardInputReachesTheSerialPort(engine: String) throws {
        let r = try swiftvisor(["run", "echo", "--engine", engine], stdin: "typed by a user\n")
        #expect(r.stdout == "echo: typed by a user\n")
        #expect(r.status == 0)
    }

    @Test(arguments: CLIDeviceTests.engines)
    func timeoutExitsWith124(engine: String) throws {
        let r = try swiftvisor(["run", "echo", "--timeout", "0.3", "--engine", engine], stdin: "")
        #expect(r.status == 124)
        #expect(r.stderr.contains("timed out"))
    }
}

/// Devices from the command line, on the software engine (runs anywhere) and KVM.
@Suite struct CLIDeviceTests {
    static var engines: [String] { TestEngines.available.map(\.rawValue) }

    func temporaryImage(_ sector0: String, sectors: Int = 16) throws -> String {
        let path = NSTemporaryDirectory() + "swiftvisor-cli-disk-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).img"
        var bytes = [UInt8](repeating: 0, count: sectors * 512)
        bytes.replaceSubrange(0..<sector0.utf8.count, with: Array(sector0.utf8))
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    @Test(arguments: engines)
    func diskGuestWritesTheImageFile(engine: String) throws {
        let image = try temporaryImage("an image made by the CLI test\n")
        defer { unlink(image) }
        let r = try swiftvisor(["run", "disk", "--disk", image, "--engine", engine])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("disk: sector 0: an image made by the CLI test"))
        let data = try Data(contentsOf: URL(fileURLWithPath: image))
        #expect(String(decoding: data[512..<556], as: UTF8.self) == "written by the disk guest through virtio-blk")
        // One interrupt per request, however the engine times the completion.
        #expect(r.stdout.contains("(5 notifies, 5 interrupts)"), "\(r.stdout)")
    }

    /// Exactly the same output on the software engine, translated and interpreted.
    @Test func diskGuestPrintsTheSameWithAndWithoutTranslation() throws {
        var outputs: [String] = []
        for extra in [[], ["--no-translation"]] {
            let image = try temporaryImage("same on both paths\n")
            defer { unlink(image) }
            let r = try swiftvisor(["run", "disk", "--disk", image, "--engine", "software"] + extra)
            #expect(r.status == 0, "\(r.stderr)")
            outputs.append(r.stdout)
        }
        #expect(outputs[0] == outputs[1])
    }

    @Test(arguments: engines)
    func twoVMsOnOneSwitchAndTheHybridGuest(engine: String) throws {
        let r = try swiftvisor(["run", "net-ping count=3", "net-ping pong=1 count=3", "--net", "switch:lan", "--engine", engine])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("[vm0] net: echoed 3 of 3 frames\n"))
        #expect(r.stdout.contains("[vm1] net: answered 3 of 3 frames\n"))

        let image = try temporaryImage("S3: one guest, three devices\n")
        defer { unlink(image) }
        let h = try swiftvisor(["run", "hybrid", "net-ping pong=1 count=1", "--disk", image, "--net", "switch:lan", "--engine", engine])
        #expect(h.status == 0, "\(h.stderr)")
        #expect(h.stdout.contains("[vm0] hybrid: echo received and stored in sector 2\n"))
        let data = try Data(contentsOf: URL(fileURLWithPath: image))
        #expect(String(decoding: data[1024..<1052], as: UTF8.self) == "S3: one guest, three devices")
    }

    @Test func badDeviceArgumentsAreUsageErrors() throws {
        let a = try swiftvisor(["run", "disk", "--disk", "x.img,rw"])
        #expect(a.status == 64)
        #expect(a.stderr.contains("unknown --disk option 'rw'"))
        let b = try swiftvisor(["run", "disk", "--net", "bridge:br0"])
        #expect(b.status == 64)
        #expect(b.stderr.contains("is not switch:NAME or tap:IFNAME"))
        let c = try swiftvisor(["run", "disk", "--disk", "x.img,vm=1"])
        #expect(c.status == 64)
        #expect(c.stderr.contains("there is no VM 1"))
    }

    @Test func missingImageIsOneClearLine() throws {
        let r = try swiftvisor(["run", "disk", "--disk", "/nonexistent/disk.img", "--engine", "software"])
        #expect(r.status == 125)
        #expect(r.stderr.contains("does not exist"))
        #expect(r.stderr.split(separator: "\n").count == 1)
    }
}

extension CLIDeviceTests {
    @Test(arguments: engines)
    func virtioConsoleCarriesOutputAndInput(engine: String) throws {
        let r = try swiftvisor(["run", "vconsole", "--virtio-console", "--engine", engine], stdin: "a line for virtio\n")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "Hello through virtio-console!\nvconsole echo: a line for virtio\n")
    }
}

@Suite struct CLISnapshotTests {
    @Test(arguments: CLIDeviceTests.engines)
    func snapshotARunningCounterAndRestoreItTwice(engine: String) throws {
        let socket = NSTemporaryDirectory() + "swiftvisor-cli-\(getpid())-\(engine).sock"
        let file = NSTemporaryDirectory() + "swiftvisor-cli-\(getpid())-\(engine).snap"
        defer { unlink(file) }
        // The original VM runs in the background until it reaches its limit.
        let original = Process()
        original.executableURL = URL(fileURLWithPath: swiftvisorPath)
        original.arguments = ["run", "counter", "--engine", engine, "--cmdline", "limit=300 work=50000", "--control", socket]
        let out = Pipe()
        original.standardOutput = out
        original.standardError = FileHandle.nullDevice
        try original.run()
        // Snapshot once the counter is under way (it has printed "count 20").
        var seen = Data()
        while !String(decoding: seen, as: UTF8.self).contains("count 20\n") {
            let chunk = out.fileHandleForReading.readSomeRetrying()
            if chunk.isEmpty { break }  // the VM ended early: the expectations below say so
            seen += chunk
        }
        let create = try swiftvisor(["snapshot", "create", "--socket", socket, file, "--note", "cli test"])
        let originalOutput = String(decoding: seen + out.fileHandleForReading.readToEndRetrying(), as: UTF8.self)
        original.waitUntilExit()
        #expect(create.status == 0, "\(create.stderr)")
        #expect(create.stdout.contains("copy-on-write faults"))
        #expect(originalOutput.hasSuffix("count 300\n"))

        let inspect = try swiftvisor(["snapshot", "inspect", file])
        #expect(inspect.status == 0)
        #expect(inspect.stdout.contains("engine:       \(engine)"))
        #expect(inspect.stdout.contains("note:         cli test"))
        #expect(inspect.stdout.contains("memory checksums: OK"))

        // Two clones, one eager and one lazy: each continues the count to the limit, and
        // what it prints is the tail of what the original printed.
        for extra in [[], ["--lazy"]] {
            let clone = try swiftvisor(["snapshot", "restore", file] + extra)
            #expect(clone.status == 0, "\(clone.stderr)")
            #expect(clone.stdout.hasSuffix("count 300\n"))
            #expect(!clone.stdout.contains("count 20\n"))  // it starts after the snapshot point
            #expect(originalOutput.hasSuffix(clone.stdout))
        }
    }

    @Test func corruptSnapshotIsOneClearLineAndTheFileStays() throws {
        let file = NSTemporaryDirectory() + "swiftvisor-cli-bad-\(getpid()).snap"
        defer { unlink(file) }
        try Data("SVSNAP\0\0 but then garbage".utf8).write(to: URL(fileURLWithPath: file))
        let before = try Data(contentsOf: URL(fileURLWithPath: file))
        for args in [["snapshot", "inspect", file], ["snapshot", "restore", file]] {
            let r = try swiftvisor(args)
            #expect(r.status == 125)
            #expect(r.stderr.hasPrefix("swiftvisor: error: "))
            #expect(r.stderr.split(separator: "\n").count == 1)
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == before)
        let missing = try swiftvisor(["snapshot", "create", "--socket", "/nonexistent/vm.sock", file])
        #expect(missing.status == 125)
        #expect(missing.stderr.contains("connect failed"))
    }
}
