import Synchronization

/// Collects the bytes a guest writes to a console, from whichever thread writes them.
public final class SerialCapture: Sendable {
    private let bytes = Mutex<[UInt8]>([])

    public init() {}

    public var text: String { String(decoding: bytes.withLock { $0 }, as: UTF8.self) }
    public func append(_ b: UInt8) { bytes.withLock { $0.append(b) } }
}
