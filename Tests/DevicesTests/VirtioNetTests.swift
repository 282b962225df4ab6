import Synchronization
import TestSupport
import Testing
import VirtCore
@testable import Devices
#if canImport(Glibc)
import Glibc
#endif

/// An Ethernet frame with a local-experimental EtherType (0x88B5).
func virtioTestFrame(to dst: MACAddress, from src: MACAddress, _ payload: String) -> [UInt8] {
    dst.bytes + src.bytes + [0x88, 0xB5] + Array(payload.utf8)
}

/// One VM with a virtio-net device on `backend`.
struct VirtioNetGuest {
    let net: VirtioNet
    let guest: VirtioTestGuest

    init(_ mac: String, backend: any NetworkBackend, maxPendingFrames: Int = 256) throws {
        net = VirtioNet(mac: MACAddress(mac)!, backend: backend, maxPendingFrames: maxPendingFrames)
        guest = try VirtioTestGuest(net)
        guest.start(queues: 2)
    }

    var mac: MACAddress { net.mac }

    /// Posts `count` receive buffers of `size` bytes; returns them by head.
    func postReceiveBuffers(_ count: Int, size: Int = 1526) -> [UInt16: GuestBuffer] {
        var buffers: [UInt16: GuestBuffer] = [:]
        for _ in 0..<count {
            let p = guest.post(VirtioNet.receiveQueue, writable: [size])
            buffers[p.head] = p.writable[0]
        }
        guest.notify(VirtioNet.receiveQueue)
        return buffers
    }

    func send(_ frame: [UInt8]) {
        // Header and frame in separate descriptors, as Linux does without offloads.
        guest.post(VirtioNet.transmitQueue, readable: [[UInt8](repeating: 0, count: 12), frame])
        guest.notify(VirtioNet.transmitQueue)
    }

    /// Frames delivered into `buffers` since the last call (virtio header checked, stripped).
    func receivedFrames(_ buffers: [UInt16: GuestBuffer]) -> [[UInt8]] {
        guest.takeUsed(VirtioNet.receiveQueue).compactMap { used in
            guard let b = buffers[UInt16(used.id)], used.length >= 12 else { return nil }
            let bytes = guest.bytes(b).prefix(Int(used.length))
            guard Array(bytes.prefix(12)) == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0] else { return [] }
            return Array(bytes.dropFirst(12))
        }
    }
}

/// Hands a non-Sendable test object to exactly one other task.
struct VirtioUnchecked<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

@Suite struct VirtioNetTests {
    @Test func macAddressesParseAndPrint() {
        #expect(MACAddress("52:54:00:12:34:5a")?.bytes == [0x52, 0x54, 0x00, 0x12, 0x34, 0x5A])
        #expect(MACAddress("52-54-00-12-34-5A")?.description == "52:54:00:12:34:5a")
        #expect(MACAddress("52:54:00:12:34") == nil)
        #expect(MACAddress("52:54:00:12:34:5g") == nil)
        #expect(MACAddress([1, 2, 3]) == nil)
        #expect(MACAddress.broadcast.isMulticast)
        var rng = SplitMix64(seed: 1)
        let random = MACAddress.random(using: &rng)
        #expect(!random.isMulticast && random.bytes[0] & 2 == 2)
    }

    @Test func offersMACAndStatusAndExposesTheMAC() throws {
        let lan = NetworkSwitch(name: "config-test")
        let a = try VirtioNetGuest("02:00:00:00:00:01", backend: lan.makePort())
        let t = a.guest.transport
        #expect(t.offeredFeatures == VirtioFeature.version1 | VirtioNet.featureMAC | VirtioNet.featureStatus)
        #expect(a.guest.reg(Reg.deviceID) == 1)
        #expect((0..<6).map { UInt8(t.mmioRead(offset: 0x100 + UInt64($0), size: 1)) } == [2, 0, 0, 0, 0, 1])
        #expect(t.mmioRead(offset: 0x106, size: 2) == 1)  // link up
    }

    @Test func twoVMsOnOneSwitchExchangeFrames() throws {
        let lan = NetworkSwitch.named("virtio-test-lan0")
        #expect(NetworkSwitch.named("virtio-test-lan0") === lan)
        let a = try VirtioNetGuest("02:00:00:00:00:0a", backend: lan.makePort())
        let b = try VirtioNetGuest("02:00:00:00:00:0b", backend: lan.makePort())
        let c = try VirtioNetGuest("02:00:00:00:00:0c", backend: lan.makePort())
        let aBuffers = a.postReceiveBuffers(8)
        let bBuffers = b.postReceiveBuffers(8)
        let cBuffers = c.postReceiveBuffers(8)

        // A broadcasts: B and C get it, A does not get its own frame back.
        let hello = virtioTestFrame(to: .broadcast, from: a.mac, "who is b?")
        a.send(hello)
        #expect(b.receivedFrames(bBuffers) == [hello])
        #expect(c.receivedFrames(cBuffers) == [hello])
        #expect(a.receivedFrames(aBuffers).isEmpty)
        #expect(b.guest.reg(Reg.interruptStatus) & VirtioInterrupt.usedBuffer != 0)

        // B answers A directly: the switch learned A, so C sees nothing.
        let reply = virtioTestFrame(to: a.mac, from: b.mac, "b is here")
        b.send(reply)
        #expect(a.receivedFrames(aBuffers) == [reply])
        #expect(c.receivedFrames(cBuffers).isEmpty)
        let unicast = virtioTestFrame(to: b.mac, from: a.mac, "thanks")
        a.send(unicast)
        #expect(b.receivedFrames(bBuffers) == [unicast])
        #expect(c.receivedFrames(cBuffers).isEmpty)

        #expect(a.guest.takeUsed(VirtioNet.transmitQueue).count == 2)
        #expect(a.net.statistics.transmittedFrames == 2)
        #expect(b.net.statistics.receivedFrames == 2)
        #expect(b.net.statistics.receivedBytes == UInt64(hello.count + unicast.count))
        #expect(lan.statistics == NetworkSwitch.Statistics(forwarded: 2, flooded: 1, dropped: 0))
        #expect(lan.port(for: a.mac) != nil && lan.port(for: c.mac) == nil)
    }

    @Test func portsLeaveTheSwitchWithTheirDevice() throws {
        let lan = NetworkSwitch(name: "leave-test")
        var b: VirtioNetGuest? = try VirtioNetGuest("02:00:00:00:00:0b", backend: lan.makePort())
        let a = try VirtioNetGuest("02:00:00:00:00:0a", backend: lan.makePort())
        b?.send(virtioTestFrame(to: .broadcast, from: b!.mac, "hi"))
        #expect(lan.portCount == 2 && lan.port(for: b!.mac) != nil)
        b = nil
        #expect(lan.portCount == 1)
        #expect(lan.port(for: MACAddress("02:00:00:00:00:0b")!) == nil)
        a.send(virtioTestFrame(to: MACAddress("02:00:00:00:00:0b")!, from: a.mac, "anyone?"))
        #expect(lan.statistics.flooded == 2)
    }

    @Test func framesWithoutReceiveBuffersWaitBoundedThenDrop() throws {
        let lan = NetworkSwitch(name: "drop-test")
        let a = try VirtioNetGuest("02:00:00:00:00:0a", backend: lan.makePort())
        let b = try VirtioNetGuest("02:00:00:00:00:0b", backend: lan.makePort(), maxPendingFrames: 4)
        let frames = (0..<6).map { virtioTestFrame(to: b.mac, from: a.mac, "frame \($0)") }
        for f in frames { a.send(f) }
        #expect(b.net.pendingFrames == 4)
        #expect(b.net.statistics.receiveDropped == 2)
        let buffers = b.postReceiveBuffers(8)
        #expect(b.receivedFrames(buffers) == Array(frames.prefix(4)))
        #expect(b.net.pendingFrames == 0)
    }

    @Test func framesBeforeDriverOKAreDropped() throws {
        let lan = NetworkSwitch(name: "early-test")
        let a = try VirtioNetGuest("02:00:00:00:00:0a", backend: lan.makePort())
        let late = VirtioNet(mac: MACAddress("02:00:00:00:00:0b")!, backend: lan.makePort())
        let g = try VirtioTestGuest(late)
        a.send(virtioTestFrame(to: .broadcast, from: a.mac, "too early"))
        #expect(late.statistics.receiveDroppedNotReady == 1)
        #expect(late.pendingFrames == 0)
        g.start(queues: 2)
        a.send(virtioTestFrame(to: .broadcast, from: a.mac, "in time"))
        #expect(late.pendingFrames == 1)
    }

    @Test func malformedFramesAndSmallBuffersAreCountedNotFatal() throws {
        let lan = NetworkSwitch(name: "malformed-test")
        let a = try VirtioNetGuest("02:00:00:00:00:0a", backend: lan.makePort())
        let b = try VirtioNetGuest("02:00:00:00:00:0b", backend: lan.makePort())
        // Shorter than header + Ethernet header; header only.
        a.guest.post(VirtioNet.transmitQueue, readable: [[UInt8](repeating: 0, count: 20)])
        a.guest.post(VirtioNet.transmitQueue, readable: [[UInt8](repeating: 0, count: 5)])
        a.guest.notify(VirtioNet.transmitQueue)
        #expect(a.guest.takeUsed(VirtioNet.transmitQueue).count == 2)
        #expect(a.net.statistics.transmitDropped == 2)
        #expect(lan.statistics.flooded == 0)

        // A receive buffer too small for the frame comes back empty; the frame waits for
        // the next buffer.
        let small = b.postReceiveBuffers(1, size: 20)
        var buffers = b.postReceiveBuffers(1)
        buffers.merge(small) { x, _ in x }
        let frame = virtioTestFrame(to: b.mac, from: a.mac, "a frame longer than eight bytes")
        a.send(frame)
        let used = b.guest.takeUsed(VirtioNet.receiveQueue)
        #expect(used.map(\.length) == [0, UInt32(12 + frame.count)])
        #expect(b.net.statistics.receiveDropped == 0 && b.net.statistics.receivedFrames == 1)
        #expect(b.guest.transport.diagnostics.count(of: "netReceiveBufferTooSmall") == 1)
        #expect(b.guest.status & VirtioStatus.deviceNeedsReset == 0)
        #expect(a.guest.transport.diagnostics.count(of: "netBadTransmitLength") == 2)
    }

    @Test func concurrentSendersOnOneSwitchDoNotDeadlock() async throws {
        let lan = NetworkSwitch(name: "concurrent-test")
        let a = try VirtioNetGuest("02:00:00:00:00:0a", backend: lan.makePort(), maxPendingFrames: 100_000)
        let b = try VirtioNetGuest("02:00:00:00:00:0b", backend: lan.makePort(), maxPendingFrames: 100_000)
        // Each side's vCPU sends to the other while the other sends back: the device
        // never holds its transport lock while calling the switch.
        let aMAC = a.mac, bMAC = b.mac
        let aDevice = a.net, bDevice = b.net
        let bSide = VirtioUnchecked(b)  // used by the other task only
        async let other: Void = Task.detached {
            for i in 0..<2000 { bSide.value.send(virtioTestFrame(to: aMAC, from: bMAC, "b\(i)")) }
        }.value
        for i in 0..<500 { a.send(virtioTestFrame(to: bMAC, from: aMAC, "a\(i)")) }
        await other
        #expect(aDevice.statistics.transmittedFrames == 500)
        #expect(aDevice.pendingFrames + Int(aDevice.statistics.receiveDropped) == 2000)
        #expect(bDevice.pendingFrames == 500)
        #expect(bDevice.statistics.transmittedFrames == 2000)
    }
}

// MARK: - TAP

/// Whether the TAP test can run here: it needs root, /dev/net/tun, and permission to make
/// a private network namespace (so it cannot disturb the host's interfaces).
enum VirtioTAPEnvironment {
    typealias UnshareFunction = @convention(c) (Int32) -> Int32
    static let newNetworkNamespace: Int32 = 0x4000_0000  // CLONE_NEWNET

    /// unshare(2) is not visible to Swift (it needs _GNU_SOURCE); look it up in libc.
    static let unshare: UnshareFunction? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "unshare") else { return nil }
        return unsafeBitCast(symbol, to: UnshareFunction.self)
    }()

    static let available: Bool = {
        guard getuid() == 0, access("/dev/net/tun", R_OK | W_OK) == 0, let unshare else { return false }
        // Try on a throwaway thread: a namespace change is per thread and dies with it.
        return runOnFreshThread { unshare(newNetworkNamespace) == 0 }
    }()
}

final class VirtioThreadTask: @unchecked Sendable {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

/// Runs `body` on a new pthread and waits for it: a thread of its own, so per-thread
/// state such as a network namespace does not leak into the test runner's threads.
func runOnFreshThread<R>(_ body: @escaping () -> R) -> R {
    var result: R?
    let task = VirtioThreadTask { result = body() }
    var thread = pthread_t()
    let created = pthread_create(&thread, nil, { context in
        guard let context else { return nil }
        Unmanaged<VirtioThreadTask>.fromOpaque(context).takeRetainedValue().body()
        return nil
    }, Unmanaged.passRetained(task).toOpaque())
    precondition(created == 0, "pthread_create failed")
    pthread_join(thread, nil)
    return result!
}

/// ioctl on a 40-byte struct ifreq naming `interface`, with a 16-bit flags field.
private func interfaceFlags(_ socket: Int32, _ interface: String, set flags: Int16? = nil) -> Int16? {
    var request = [UInt8](repeating: 0, count: 40)
    request.replaceSubrange(0..<interface.utf8.count, with: Array(interface.utf8))
    let get: UInt = 0x8913, setFlags: UInt = 0x8914  // SIOCGIFFLAGS, SIOCSIFFLAGS
    guard request.withUnsafeMutableBytes({ ioctl(socket, get, $0.baseAddress!) }) == 0 else { return nil }
    guard let flags else { return Int16(request[16]) | Int16(request[17]) << 8 }
    let current = Int16(request[16]) | Int16(request[17]) << 8
    withUnsafeBytes(of: (current | flags).littleEndian) { request.replaceSubrange(16..<18, with: $0) }
    guard request.withUnsafeMutableBytes({ ioctl(socket, setFlags, $0.baseAddress!) }) == 0 else { return nil }
    return current | flags
}

@Suite struct VirtioTAPTests {
    struct Outcome {
        var problems: [String] = []
        var guestGot: [[UInt8]] = []
        var hostGot: [[UInt8]] = []
        var interfaceName = ""
    }

    @Test(.enabled(if: VirtioTAPEnvironment.available,
                   "needs root, /dev/net/tun and CAP_SYS_ADMIN for a private network namespace"))
    func frameRoundTripThroughATAPInterface() throws {
        let toGuestPayload = "host to guest"
        let toHostPayload = "guest to host"
        let outcome = runOnFreshThread { () -> Outcome in
            var out = Outcome()
            guard VirtioTAPEnvironment.unshare?(VirtioTAPEnvironment.newNetworkNamespace) == 0 else {
                out.problems.append("unshare(CLONE_NEWNET) failed: errno \(errno)")
                return out
            }
            do {
                let tap = try TAPBackend(interfaceName: "svtap%d")
                out.interfaceName = tap.interfaceName
                let vm = try VirtioNetGuest("02:00:00:00:00:0a", backend: tap)
                let buffers = vm.postReceiveBuffers(64)

                let control = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
                defer { close(control) }
                guard interfaceFlags(control, tap.interfaceName, set: 0x1 /* IFF_UP */) != nil else {
                    out.problems.append("could not bring \(tap.interfaceName) up: errno \(errno)")
                    return out
                }
                // A packet socket on the interface plays the host's side of the wire.
                let packet = socket(AF_PACKET, Int32(SOCK_RAW.rawValue), Int32(UInt16(0x0003).bigEndian))
                defer { close(packet) }
                var address = [UInt8](repeating: 0, count: 20)  // struct sockaddr_ll
                address[0] = UInt8(AF_PACKET); address[2] = 0x00; address[3] = 0x03
                withUnsafeBytes(of: Int32(if_nametoindex(tap.interfaceName)).littleEndian) { address.replaceSubrange(4..<8, with: $0) }
                let bound = address.withUnsafeBytes {
                    bind(packet, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(20))
                }
                var timeout = timeval(tv_sec: 0, tv_usec: 200_000)
                setsockopt(packet, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
                guard packet >= 0, bound == 0 else {
                    out.problems.append("packet socket: errno \(errno)")
                    return out
                }

                let peer = MACAddress("02:00:00:00:00:0b")!
                let toGuest = virtioTestFrame(to: vm.mac, from: peer, toGuestPayload)
                _ = toGuest.withUnsafeBytes { send(packet, $0.baseAddress, $0.count, 0) }
                _ = waitUntil(seconds: 3) {
                    out.guestGot += vm.receivedFrames(buffers).filter { $0.count >= 14 && $0[12] == 0x88 && $0[13] == 0xB5 }
                    return !out.guestGot.isEmpty
                }

                vm.send(virtioTestFrame(to: peer, from: vm.mac, toHostPayload))
                var frame = [UInt8](repeating: 0, count: 2048)
                for _ in 0..<15 where out.hostGot.isEmpty {
                    let n = frame.withUnsafeMutableBytes { recv(packet, $0.baseAddress, $0.count, 0) }
                    if n >= 14, frame[12] == 0x88, frame[13] == 0xB5, Array(frame[6..<12]) == vm.mac.bytes {
                        out.hostGot.append(Array(frame[0..<n]))
                    }
                }
                if tap.statistics.sentFrames == 0 { out.problems.append("TAP wrote no frames: \(tap.statistics)") }
            } catch {
                out.problems.append("\(error)")
            }
            return out
        }
        #expect(outcome.problems.isEmpty, "\(outcome.problems)")
        #expect(outcome.interfaceName.hasPrefix("svtap"))
        #expect(outcome.guestGot.map { String(decoding: $0.dropFirst(14), as: UTF8.self) } == [toGuestPayload])
        #expect(outcome.hostGot.map { String(decoding: $0.dropFirst(14), as: UTF8.self) } == [toHostPayload])
    }

    @Test func tapErrorsAreExplained() {
        #expect(throws: TAPError.invalidInterfaceName("a/b")) { try TAPBackend(interfaceName: "a/b") }
        #expect(throws: TAPError.invalidInterfaceName("")) { try TAPBackend(interfaceName: "") }
        #expect(throws: TAPError.invalidInterfaceName("much-too-long-name")) { try TAPBackend(interfaceName: "much-too-long-name") }
        #expect(TAPError.permissionDenied(interface: "tap0").description.contains("CAP_NET_ADMIN"))
    }
}
