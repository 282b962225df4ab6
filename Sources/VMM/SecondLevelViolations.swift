import VirtCore

extension Machine {
    /// Installs (nil: removes) what the run loop calls for a second-level violation
    /// (`.memoryFault`, or one the shadow pager found): true when handled, and the access
    /// is retried; false stops the machine with an engine failure. Runs on the vCPU's
    /// thread while that vCPU is out of `run()`.
    public func setSecondLevelViolationHandler(_ handler: (@Sendable (UInt64, MemoryAccessKind) -> Bool)?) {
        memoryFaultHandler.set(handler)
    }
}
