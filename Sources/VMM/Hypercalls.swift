import VirtCore

/// The VMM's hypercall table (numbers in docs/guest-abi.md). Unknown numbers return ~0,
/// like an unimplemented syscall, so a guest can probe for services.
public struct HypercallTable: Sendable {
    public typealias Handler = @Sendable (Hypercall, _ vcpu: Int) -> UInt64
    public static let ping: UInt64 = 0
    public static let unknownResult = UInt64.max

    private var handlers: [UInt64: Handler] = [:]

    public init() {
        // Ping: returns the sum of its arguments, so a guest can check that arguments and
        // the result travel correctly on both engines.
        handlers[Self.ping] = { hc, _ in hc.arg0 &+ hc.arg1 &+ hc.arg2 &+ hc.arg3 }
    }

    public mutating func register(_ number: UInt64, _ handler: @escaping Handler) { handlers[number] = handler }

    public func handle(_ call: Hypercall, vcpu: Int) -> UInt64 {
        handlers[call.number]?(call, vcpu) ?? Self.unknownResult
    }
}
