import Synchronization
import SwiftvisorKit
#if canImport(Glibc)
import Glibc
#endif

// KVM where /dev/kvm is usable, else the software engine.
let engine = EngineSelection.makeDefault { print("note: \($0)") }
let lines = Mutex(0)
var configuration = MachineConfiguration(memorySize: 32 << 20, commandLine: "limit=400 work=20000", guestName: "counter")
configuration.timeoutSeconds = 60
let machine = try Machine(image: try GuestProgram.load("counter"), configuration: configuration, engine: engine) { byte in
    if byte == UInt8(ascii: "\n") { lines.withLock { $0 += 1 } }
}
let vm = HostThread(name: "vm") { _ = try? machine.run() }

while lines.withLock({ $0 }) < 20 { HostThread.sleep(milliseconds: 1) }
machine.pause()
let rip = try machine.vcpuState(0).rip
let seen = lines.withLock { $0 }
let snapshot = try machine.snapshot(to: HostPaths.temporaryDirectory + "embed-example.snap", note: "from Examples/embed")
machine.resume()
machine.stop()
vm.join()

print("engine \(engine.name): paused after \(seen) lines at rip 0x\(String(rip, radix: 16)); snapshot \(snapshot.path): "
      + "\(snapshot.fileBytes) bytes, guest paused \((snapshot.pauseSeconds * 1000).fixed(2)) ms")
unlink(snapshot.path)
