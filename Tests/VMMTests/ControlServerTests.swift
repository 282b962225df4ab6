import Foundation
import TestSupport
import Testing
import VirtCore
@testable import VMM
import Devices
#if canImport(Glibc)
import Glibc
#endif

@Suite struct ControlServerTests {
    @Test(arguments: TestEngines.available)
    func balloonOnCommandGivesMemoryBackAndStatusReports(engine: EngineChoice) throws {
        let m = try bundledMachine("balloon", engine: engine, memory: 64 << 20, capture: SerialCapture())
        let balloon = try m.addVirtioBalloon()
        let socket = temporaryPath("ctl") + ".sock"
        let server = try ControlServer(machine: m, path: socket)
        defer { server.close() }
        let runner = HostThread(name: "balloon-vm") { _ = try? m.run() }
        defer { m.stop(); runner.join() }
        // The guest touches its whole page pool (most of RAM) before taking commands.
        #expect(waitUntil { m.memory.allocatedBytes >= 60 << 20 })
        let before = m.memory.allocatedBytes
        let reply = try ControlServer.send("balloon 4096", to: socket)
        #expect(reply.ok)
        #expect(reply.balloon?.targetPages == 4096)
        #expect(waitUntil { balloon.actualPages == 4096 })
        #expect(m.memory.allocatedBytes <= m.memory.size - (16 << 20))  // 16 MiB went back to the host
        #expect(m.memory.allocatedBytes < before)
        let status = try ControlServer.send("status", to: socket)
        #expect(status.status?.engine == engine.rawValue)
        let bad = try ControlServer.send("balloon lots", to: socket)
        #expect(!bad.ok && bad.error?.contains("usage") == true)
        #expect(try !ControlServer.send("frobnicate", to: socket).ok)
        _ = try ControlServer.send("balloon \(VirtioBalloon.quitTarget)", to: socket)
    }
}
