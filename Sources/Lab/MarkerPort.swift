import Devices
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import VirtCore

/// Port 0x81: the guest writes a marker at the start and end of the phase a lab measures;
/// the host takes the time of each write (in the vCPU thread, at the exit).
// SAFETY: `marks` is touched only under `lock`.
final class MarkerPort: PortIODevice, @unchecked Sendable {
    static let port: UInt16 = 0x81
    var name: String { "marker-port" }
    private let lock = HostLock()
    private var marks: [(value: UInt32, nanoseconds: UInt64)] = []

    func portRead(offset: UInt16, size: UInt8) -> UInt32 { 0 }
    func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        let now = monotonicNanoseconds()
        lock.withLock { marks.append((value, now)) }
    }

    /// Nanoseconds between the first `from` marker and the first `to` marker after it.
    func interval(from: UInt32, to: UInt32) -> UInt64? {
        lock.withLock {
            guard let a = marks.firstIndex(where: { $0.value == from }),
                  let b = marks[a...].firstIndex(where: { $0.value == to }) else { return nil }
            return marks[b].nanoseconds - marks[a].nanoseconds
        }
    }
}
