import Devices
import GuestImages
import KVMEngine
import TestSupport
import Testing
import VirtCore
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// The bundled guests on every engine this host has.
@Suite struct MachineGuestTests {
    @Test(arguments: TestEngines.available)
    func helloPrintsItsGreetingAndExitsZero(engine: EngineChoice) throws {
        let r = try runGuest("hello", engine: engine)
        #expect(r.output == "Hello from Swiftvisor! 32 MiB RAM, 1 vCPU\n")
        #expect(r.result.stopReason == .exitPort(status: 0))
        // Every console byte is a THR write plus an LSR poll, each one exit.
        #expect(r.result.statistics.ports[0x3F8]?.count == UInt64(r.output.utf8.count))
        #expect(r.result.statistics.ports[0xF4]?.count == 1)
    }

    @Test(arguments: TestEngines.available)
    func computeWorkloadsGiveTheirKnownChecksums(engine: EngineChoice) throws {
        let r = try runGuest("compute", engine: engine)
        #expect(r.output == """
            sieve: primes below 1000000 = 78498
            crc32: checksum=bb52c326
            heapsort: checksum=edc2c80d
            sha-mix: checksum=078ae5e5
            compute: done (scale 1)

            """)
        #expect(r.result.stopReason == .exitPort(status: 0))
    }

    @Test(arguments: TestEngines.available, [0, 3])
    func pioLoopTrapsEveryWrite(engine: EngineChoice, ring: Int) throws {
        let r = try runGuest("pio-loop", engine: engine, commandLine: "count=2000 ring=\(ring)")
        #expect(r.output == "pio-loop: 2000 writes at CPL\(ring)\n")
        #expect(r.machine.benchPort.writes == 2000)
        #expect(r.result.statistics.ports[0x80]?.count == 2000)
        #expect(r.result.stopReason == .exitPort(status: 0))
    }

    @Test(arguments: TestEngines.available, [2, 4])
    func smpVCPUsAgreeOnTheSharedCounter(engine: EngineChoice, vcpus: Int) throws {
        let r = try runGuest("smp", engine: engine, vcpus: vcpus, commandLine: "count=5000")
        let lines = (0..<vcpus).map { "cpu \($0) reported\n" }.joined()
        #expect(r.output == lines + "smp: \(vcpus) cpus, counter=\(vcpus * 5000)\n")
        #expect(r.result.stopReason == .exitPort(status: 0))
        #expect(r.result.perVCPUStatistics.count == vcpus)
        // Secondary vCPUs finish with hlt.
        #expect(r.result.statistics[.halt].count == UInt64(vcpus - 1))
    }

    @Test(arguments: TestEngines.available)
    func unmappedAddressIsAnMMIOExitReadingAllOnes(engine: EngineChoice) throws {
        let r = try runGuest("mmio-touch", engine: engine, recordExits: true)
        #expect(r.output == "mmio-touch: read 0xffffffff\n")
        let mmio = r.result.exitTrace[0].compactMap { e -> MMIOAccess? in if case let .mmio(a) = e { return a } else { return nil } }
        #expect(mmio == [MMIOAccess(address: 0xD000_0000, size: 4, direction: .read),
                         MMIOAccess(address: 0xD000_0000, size: 4, direction: .write, value: 0x1234_5678)])
        #expect(r.result.statistics.mmioRanges[0xD000_0000]?.count == 2)
        #expect(r.machine.bus.unhandledAccesses == 2)
    }

    @Test(arguments: TestEngines.available)
    func tripleFaultIsAShutdownWithState(engine: EngineChoice) throws {
        let r = try runGuest("triple-fault", engine: engine)
        #expect(r.output == "triple-fault: loading an empty IDT\n")
        guard case let .shutdown(vcpu, state) = r.result.stopReason else {
            Issue.record("expected a shutdown, got \(r.result.stopReason)")
            return
        }
        #expect(vcpu == 0)
        let s = try #require(state)
        #expect(s.idt.limit == 0)
        #expect(s.cpl == 0)
        #expect(s.dump.contains("rip="))
    }

    @Test(arguments: TestEngines.available)
    func guestExceptionHandlerReportsVectorAndExitStatus(engine: EngineChoice) throws {
        let r = try runGuest("fault", engine: engine)
        #expect(r.output.hasPrefix("fault: executing ud2\nexception 6 error=0x0 rip=0x"))
        #expect(r.result.stopReason == .exitPort(status: 0x86))
    }

    @Test(arguments: TestEngines.available)
    func hypercallsCarryArgumentsAndResults(engine: EngineChoice) throws {
        let r = try runGuest("hypercall", engine: engine)
        #expect(r.output == "hypercall: result=10\nhypercall: unknown=0xffffffffffffffff\n")
        #expect(r.result.statistics[.hypercall].count == 2)
        #expect(r.result.stopReason == .exitPort(status: 0))
    }

    @Test(arguments: TestEngines.available)
    func userModeRoundTrip(engine: EngineChoice) throws {
        let r = try runGuest("user-mode", engine: engine)
        #expect(r.output == "cpl=3\ncpl=0\n")
        #expect(r.result.stopReason == .exitPort(status: 0))
    }

    @Test(arguments: TestEngines.available)
    func serialInputReachesTheGuest(engine: EngineChoice) throws {
        let r = try runGuest("echo", engine: engine, input: "ping from host\n")
        #expect(r.output == "echo: ping from host\n")
    }

    @Test(arguments: TestEngines.available)
    func timeoutStopsAGuestWaitingForever(engine: EngineChoice) throws {
        // echo waits for a line that never comes.
        let r = try runGuest("echo", engine: engine, timeout: 0.5)
        #expect(r.result.stopReason == .timeout)
    }

    @Test(arguments: TestEngines.available)
    func stopFromAnotherThread(engine: EngineChoice) throws {
        let machine = try bundledMachine("echo", engine: engine, memory: 16 << 20, capture: SerialCapture())
        let stopper = HostThread(name: "stopper") { usleep(100_000); machine.stop() }
        let r = try machine.run()
        stopper.join()
        #expect(r.stopReason == .stopped)
        #expect(throws: MachineError.alreadyRan) { _ = try machine.run() }
    }

    @Test(arguments: TestEngines.available)
    func configurationIsValidated(engine: EngineChoice) throws {
        let image = try ELFImage(bytes: try #require(BundledGuests.named("hello")).elf)
        let vmEngine = try TestEngines.make(engine)
        #expect(throws: MachineError.invalidMemorySize(1 << 20)) {
            _ = try Machine(image: image, configuration: MachineConfiguration(memorySize: 1 << 20), engine: vmEngine, serialOutput: { _ in })
        }
        #expect(throws: MachineError.invalidVCPUCount(17)) {
            _ = try Machine(image: image, configuration: MachineConfiguration(vcpuCount: 17), engine: vmEngine, serialOutput: { _ in })
        }
        let long = String(repeating: "x", count: 5000)
        #expect(throws: MachineError.commandLineTooLong(5000)) {
            _ = try Machine(image: image, configuration: MachineConfiguration(commandLine: long), engine: vmEngine, serialOutput: { _ in })
        }
    }
}

@Suite struct StopReasonTests {
    @Test func internalErrorDescriptionShowsRIPAndBytes() {
        let failure = EngineFailure.internalError(suberror: 1, data: [0x1, 0xcc0f], instructionBytes: [0x0F, 0xC7, 0x0E], rip: 0x10_0000)
        #expect(StopReason.engineFailure(vcpu: 0, failure: failure).summary == "vCPU 0: " + failure.description)
        #expect(failure.description == "internal error (suberror 1: instruction emulation failed) at rip 0x100000, instruction bytes: 0f c7 0e, data: 0x1 0xcc0f")
    }
}

@Suite struct EngineSelectionTests {
    @Test func missingKVMDeviceGivesTheClearError() {
        #expect(throws: KVMError.deviceMissing(path: "/no/such/kvm")) {
            _ = try EngineSelection.make(.kvm, kvmPath: "/no/such/kvm")
        }
    }

    @Test func bundledGuestsAreValidImages() throws {
        let names = BundledGuests.all.map(\.name)
        for required in ["hello", "compute", "pio-loop", "smp"] { #expect(names.contains(required)) }
        for g in BundledGuests.all {
            let image = try ELFImage(bytes: g.elf)
            #expect(image.entry >= BootLayout.imageBase)
            #expect(!g.summary.isEmpty, "guest \(g.name) has a summary line")
        }
    }

    @Test func unknownGuestNameListsTheBundledOnes() {
        #expect(throws: GuestProgramError.notFound("nope")) { _ = try GuestProgram.load("nope") }
        #expect(GuestProgramError.notFound("nope").description.contains("hello"))
    }

    @Test func malformedFileIsRejectedWithItsPath() throws {
        let path = "/tmp/swiftvisor-test-\(getpid()).elf"
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        let junk = [UInt8](repeating: 0x41, count: 100)
        _ = write(fd, junk, junk.count)
        close(fd)
        defer { unlink(path) }
        #expect(throws: GuestProgramError.invalid(source: path, .badMagic)) { _ = try GuestProgram.load(path) }
    }
}
