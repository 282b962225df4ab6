import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// Waits (bounded) until `condition` holds, checking every millisecond; false on timeout.
public func waitUntil(seconds: Double = 60, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
    while !condition() {
        if monotonicNanoseconds() > deadline { return false }
        usleep(1000)
    }
    return true
}
