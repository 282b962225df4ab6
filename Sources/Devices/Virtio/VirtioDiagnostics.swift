import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Something a guest driver (or, rarely, the host backing a device) did wrong that the
/// virtio layer noticed and survived. `kind` groups reports so each kind is logged once.
public protocol VirtioFault: Error, CustomStringConvertible, Sendable {
    /// A short stable name for the kind of fault, e.g. "descriptorLoop".
    var kind: String { get }
}

/// Counts and logs the faults of one virtio device.
///
/// Guest drivers can produce faults at any rate, so only the first fault of each kind is
/// logged; the rest are counted. The VMM reads `errorCount`, `lastError` and
/// `count(of:)` to show what went wrong without scraping stderr.
public final class VirtioDiagnostics: Sendable {
    public typealias LogSink = @Sendable (String) -> Void

    /// Writes one line to the host's standard error.
    public static let standardError: LogSink = { line in
        // write(2) rather than stdio: no shared FILE state between threads.
        var text = line + "\n"
        text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    }

    private struct State {
        var total: UInt64 = 0
        var byKind: [String: UInt64] = [:]
        var last: String?
    }

    public let deviceName: String
    private let state = Mutex(State())
    private let sink: LogSink

    /// `log` receives each first-of-its-kind report as one line. It may be called with
    /// the device's locks held, so it must not call back into the device.
    public init(deviceName: String, log: @escaping LogSink = VirtioDiagnostics.standardError) {
        self.deviceName = deviceName
        self.sink = log
    }

    /// Counts `fault`; logs it if it is the first of its kind.
    public func record(_ fault: some VirtioFault) {
        let line = "virtio \(deviceName): \(fault.description)"
        let first = state.withLock { s -> Bool in
            s.total += 1
            s.last = line
            let n = s.byKind[fault.kind, default: 0] + 1
            s.byKind[fault.kind] = n
            return n == 1
        }
        if first { sink(line + " (further \(fault.kind) faults are counted, not logged)") }
    }

    /// Faults recorded since the device was created (a reset does not clear them).
    public var errorCount: UInt64 { state.withLock { $0.total } }
    /// The most recent fault, prefixed with the device name.
    public var lastError: String? { state.withLock { $0.last } }
    public func count(of kind: String) -> UInt64 { state.withLock { $0.byKind[kind, default: 0] } }
    /// Every kind seen so far with its count.
    public var counts: [String: UInt64] { state.withLock { $0.byKind } }
}
