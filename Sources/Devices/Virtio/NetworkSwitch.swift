import Synchronization

/// A learning Ethernet switch inside this process, connecting the network devices of the
/// VMs it runs.
///
/// Each device gets its own `Port`. The switch learns which port a source MAC lives
/// behind; frames to a learned unicast address go to that port only, and broadcast,
/// multicast and unknown destinations are flooded to every other port. A frame is never
/// sent back out of the port it came from. Delivery happens on the sending thread, with
/// no switch lock held (the receiving device only queues the frame).
public final class NetworkSwitch: Sendable {
    /// Bound on the MAC table: a guest sending from random source addresses must not grow
    /// it without limit. When full, the table is cleared and learning starts again.
    public static let maxTableEntries = 4096

    /// Counters for tests and `swiftvisor` statistics.
    public struct Statistics: Equatable, Sendable {
        /// Frames sent to exactly one learned port.
        public var forwarded: UInt64 = 0
        /// Frames sent to every other port (broadcast, multicast, unknown destination).
        public var flooded: UInt64 = 0
        /// Frames dropped: too short, or addressed to the port they came from.
        public var dropped: UInt64 = 0
    }

    private struct State {
        var nextPort = 0
        var ports: [Int: WeakReceiver] = [:]
        var table: [MACAddress: Int] = [:]
        var stats = Statistics()
    }

    private static let registry = Mutex<[String: NetworkSwitch]>([:])

    /// The process-wide switch called `name`, created on first use. Named switches live
    /// as long as the process.
    public static func named(_ name: String) -> NetworkSwitch {
        registry.withLock { switches in
            if let s = switches[name] { return s }
            let s = NetworkSwitch(name: name)
            switches[name] = s
            return s
        }
    }

    public let name: String
    private let state = Mutex(State())

    /// An unregistered switch (tests, or a VMM that manages switches itself).
    public init(name: String) { self.name = name }

    /// A new port; attach it to a device as its backend. The port leaves the switch when
    /// it is released.
    public func makePort() -> Port {
        let id = state.withLock { s -> Int in
            defer { s.nextPort += 1 }
            s.ports[s.nextPort] = WeakReceiver()
            return s.nextPort
        }
        return Port(owner: self, id: id)
    }

    public var statistics: Statistics { state.withLock { $0.stats } }
    public var portCount: Int { state.withLock { $0.ports.count } }
    /// The port a MAC was learned on, if any.
    public func port(for mac: MACAddress) -> Int? { state.withLock { $0.table[mac] } }

    fileprivate func setReceiver(_ receiver: (any NetworkFrameReceiver)?, port: Int) {
        state.withLock { s in
            if s.ports[port] != nil { s.ports[port] = WeakReceiver(value: receiver) }
        }
    }

    fileprivate func remove(port: Int) {
        state.withLock { s in
            s.ports[port] = nil
            s.table = s.table.filter { $0.value != port }
        }
    }

    fileprivate func forward(_ frame: [UInt8], from port: Int) {
        let targets = state.withLock { s -> [any NetworkFrameReceiver] in
            guard frame.count >= VirtioNet.minimumFrameSize else {
                s.stats.dropped += 1
                return []
            }
            let destination = MACAddress(frame: frame, at: 0)
            let source = MACAddress(frame: frame, at: 6)
            if !source.isMulticast, s.ports[port] != nil {
                if s.table[source] == nil, s.table.count >= Self.maxTableEntries { s.table.removeAll() }
                s.table[source] = port
            }
            if !destination.isMulticast, let target = s.table[destination] {
                guard target != port, let receiver = s.ports[target]?.value else {
                    s.stats.dropped += 1
                    return []
                }
                s.stats.forwarded += 1
                return [receiver]
            }
            s.stats.flooded += 1
            return s.ports.filter { $0.key != port }.sorted { $0.key < $1.key }.compactMap { $0.value.value }
        }
        for receiver in targets { receiver.receiveFrame(frame) }
    }

    /// One switch port: the `NetworkBackend` of one device.
    public final class Port: NetworkBackend {
        public let owner: NetworkSwitch
        public let id: Int

        fileprivate init(owner: NetworkSwitch, id: Int) {
            self.owner = owner
            self.id = id
        }

        deinit { owner.remove(port: id) }

        public func send(_ frame: [UInt8]) { owner.forward(frame, from: id) }
        public func setReceiver(_ receiver: (any NetworkFrameReceiver)?) { owner.setReceiver(receiver, port: id) }
    }
}
