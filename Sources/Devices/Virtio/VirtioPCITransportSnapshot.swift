/// Snapshots and migration of a virtio-pci transport: the virtio function, the MSI-X table
/// and the vectors the driver assigned. Configuration space belongs to the host bridge,
/// which saves and restores it (`PCIHostBridge.restoreConfig`); the MSI-X enable and
/// function-mask bits are read back from there.
extension VirtioPCITransport {
    /// The transport's state apart from configuration space.
    public struct SavedState: Codable, Sendable, Equatable {
        public var function: VirtioFunctionState
        public var msix: MSIX.SavedState
        public var configVector: UInt16
        public var queueVectors: [UInt16]
    }

    /// Call with the vCPUs paused and the transport frozen.
    public var savedState: SavedState {
        state.withLock { s in
            SavedState(function: s.function.savedState, msix: s.msix.savedState, configVector: s.configVector, queueVectors: s.queueVectors)
        }
    }

    /// Restores a saved state into a freshly made transport for the same device, after the
    /// bridge has restored `config` (its MSI-X message control). Throws, changing nothing,
    /// when the record does not fit this device.
    public func restore(_ saved: SavedState, config: PCIConfigSpace) throws {
        try state.withLock { s throws in
            guard saved.queueVectors.count == s.queueVectors.count else {
                throw VirtioDeviceError(kind: "restoreMismatch", message: "\(name): \(saved.queueVectors.count) queue vectors saved, \(s.queueVectors.count) queues here")
            }
            let vectors = [saved.configVector] + saved.queueVectors
            if let bad = vectors.first(where: { $0 != Self.noVector && Int($0) >= s.msix.vectors }) {
                throw VirtioDeviceError(kind: "restoreMismatch", message: "\(name): saved MSI-X vector \(bad) is beyond the table's \(s.msix.vectors)")
            }
            // Both checked on copies first, so a record that fails leaves the transport as it was.
            var msix = s.msix, function = s.function
            try msix.restore(saved.msix)
            try function.restore(saved.function, name: name)
            s.msix = msix
            s.function = function
            s.msixControl = msix.control(config)
            s.configVector = saved.configVector
            s.queueVectors = saved.queueVectors
        }
    }

    public func freeze() { state.withLock { $0.function.frozen = true } }

    public func thaw() {
        for q in state.withLock({ $0.function.thaw() }) { processQueue(q) }
    }
}
