/// A virtio function's state as the driver left it, for snapshots and migration: the whole
/// record of a virtio-mmio transport, and the protocol half of a virtio-pci one.
public struct VirtioFunctionState: Codable, Sendable, Equatable {
    public var status: UInt8
    public var deviceFeaturesSel: UInt32, driverFeaturesSel: UInt32
    public var driverFeatures: UInt64, negotiated: UInt64
    public var queueSel: UInt32
    public var queues: [VirtioQueue.SavedState]
    public var interruptStatus: UInt32
    public var configGeneration: UInt32
}

extension VirtioFunction {
    var savedState: VirtioFunctionState {
        VirtioFunctionState(status: status, deviceFeaturesSel: deviceFeaturesSel, driverFeaturesSel: driverFeaturesSel,
                            driverFeatures: driverFeatures, negotiated: negotiated, queueSel: queueSel,
                            queues: queues.map(\.savedState), interruptStatus: interruptStatus,
                            configGeneration: configGeneration)
    }

    /// Takes a saved state into a fresh function of the same device: a DRIVER_OK device is
    /// activated again. `name` labels the errors.
    mutating func restore(_ saved: VirtioFunctionState, name: String) throws(VirtioDeviceError) {
        guard saved.queues.count == queues.count else {
            throw VirtioDeviceError(kind: "restoreMismatch", message: "\(name): saved state has \(saved.queues.count) queues, the device \(queues.count)")
        }
        for (i, q) in saved.queues.enumerated() {
            guard q.size <= queues[i].maxSize else {
                throw VirtioDeviceError(kind: "restoreQueue", message: "\(name): saved queue \(i) has \(q.size) entries, at most \(queues[i].maxSize) here")
            }
            do throws(VirtqueueError) { try queues[i].restore(q, in: memory) } catch {
                throw VirtioDeviceError(kind: "restoreQueue", message: "\(name): saved queue \(i) is invalid: \(error)")
            }
        }
        status = saved.status
        deviceFeaturesSel = saved.deviceFeaturesSel
        driverFeaturesSel = saved.driverFeaturesSel
        driverFeatures = saved.driverFeatures
        negotiated = saved.negotiated
        queueSel = saved.queueSel
        configGeneration = saved.configGeneration
        if status & VirtioStatus.driverOK != 0 {
            do throws(VirtioDeviceError) { try device.activate(features: negotiated) } catch { enterNeedsReset() }
        }
        interruptStatus = saved.interruptStatus
    }

    /// Ends a freeze: the queues whose host-initiated processing was deferred, in order.
    mutating func thaw() -> [Int] {
        frozen = false
        defer { deferredQueues = [] }
        return deferredQueues.sorted()
    }
}

/// A virtio transport a snapshot or a migration holds still while it saves device state.
public protocol FreezableTransport: AnyObject, Sendable {
    /// Stops the device touching guest memory (host-initiated processing is deferred).
    /// The vCPUs must be paused.
    func freeze()
    /// Ends `freeze()` and processes what was deferred.
    func thaw()
}

extension VirtioMMIOTransport: FreezableTransport {}
extension VirtioPCITransport: FreezableTransport {}
