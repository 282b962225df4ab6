import VirtCore

/// `run --crash-after-ms N` (hidden; CLITests): a Swift runtime trap on vCPU 0's thread once
/// N ms have passed, the way a bug in a device or the run loop would fault while the guest
/// runs — to check that the process then ends with one line instead of running on.
struct CrashTrigger: Sendable {
    let deadline: UInt64

    init(_ milliseconds: Int) { deadline = monotonicNanoseconds() + UInt64(max(0, milliseconds)) * 1_000_000 }

    /// For `Machine.run(onTick:)`: called on vCPU 0's thread at each timer exit.
    var onTick: @Sendable () -> Void {
        let deadline = deadline
        return {
            if monotonicNanoseconds() >= deadline { fatalError("crash requested by --crash-after-ms") }
        }
    }
}
