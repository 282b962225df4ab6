import Synchronization

/// A function value that one thread sets and others read and call (a handler, an interrupt
/// line). Kept bare in a `Mutex`, a function is re-abstracted each time `withLock` lends it
/// `inout` and takes it back, so every read wraps it in two more thunks and its calls grow
/// slower without bound (5,000 reads made one call about 10⁴ times slower; COM1's interrupt
/// line cost 150 µs a byte in a Linux boot). Inside a nominal type it is stored as it is.
public final class LockedFunction<Function: Sendable>: Sendable {
    private struct Stored: Sendable { let function: Function }
    private let slot: Mutex<Stored?>

    public init(_ function: Function? = nil) { slot = Mutex(function.map(Stored.init)) }

    /// The function now set, or nil.
    public var function: Function? { slot.withLock { $0?.function } }

    public func set(_ function: Function?) { slot.withLock { $0 = function.map(Stored.init) } }
}
