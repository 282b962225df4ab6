import Synchronization

/// One SR-IOV virtual function as the VM it is assigned to sees it: a PCI function on that
/// VM's own bus, as a VMM presents a passed-through VF.
///
/// - BAR0 (4 KiB) is the VF's register page: guest RAM the NIC polls, so the driver's fast
///   path never exits. It is fixed where the VMM mapped it: sizing works (writing all ones
///   reads back ~(4 KiB − 1)), any other value written snaps back to the page's address
///   (moving it would mean remapping guest RAM under a running driver).
/// - BAR2 (4 KiB) holds the MSI-X table (one vector) and its PBA: trapped, it may be moved
///   anywhere in the bridge's BAR window.
/// - The NIC raises vector 0 when it completes a receive; the message goes when the guest
///   has enabled MSI-X and unmasked the vector, and is left pending while it is masked.
public final class AssignedVirtualFunction: PCIDevice {
    public static let registerBAR = 0, msixBAR = 2
    public static let barSize: UInt32 = 4096
    /// The vector the NIC raises on receive completion.
    public static let receiveVector = 0

    public var name: String { "sriov-vf" }
    public let registerPage: UInt64
    /// The configuration space as built: attach it to the VM's bridge.
    public let initialConfig: PCIConfigSpace
    private struct State {
        var msix: MSIX
        /// The message control register as last written (the NIC thread reads it here).
        var control: UInt16 = 0
    }
    private let state: Mutex<State>
    private let deliver: @Sendable (MSIX.Message) -> Void
    public let interruptsSent = Atomic<UInt64>(0)

    /// - Parameters:
    ///   - registerPage: guest-physical address of the VF's register page (BAR0, fixed).
    ///   - msixBase: where BAR2 starts, in the bridge's BAR window (the guest may move it).
    ///   - deliver: sends an MSI-X message (the VMM turns it into an interrupt).
    public init(registerPage: UInt64, msixBase: UInt64, deliver: @escaping @Sendable (MSIX.Message) -> Void) {
        precondition(registerPage % UInt64(Self.barSize) == 0 && registerPage < 1 << 32 && msixBase % UInt64(Self.barSize) == 0
                     && msixBase < 1 << 32, "32-bit BARs on 4 KiB boundaries")
        var config = PCIConfigSpace(vendor: SRIOVNICFunction.vendorID, device: SRIOVNICFunction.vfDeviceID,
                                    classCode: SRIOVNICFunction.ethernetClass)
        config.addMemoryBAR(Self.registerBAR, size: Self.barSize)
        config.addMemoryBAR(Self.msixBAR, size: Self.barSize)
        config.set32(PCIConfigSpace.bar0 + 4 * Self.registerBAR, UInt32(registerPage))
        config.set32(PCIConfigSpace.bar0 + 4 * Self.msixBAR, UInt32(msixBase))
        state = Mutex(State(msix: MSIX(vectors: 1, bar: Self.msixBAR, in: &config)))
        initialConfig = config
        self.registerPage = registerPage
        self.deliver = deliver
    }

    /// The NIC completed a receive: raise the receive vector. Any thread.
    public func receiveCompleted() {
        guard let m = state.withLock({ $0.msix.signal(Self.receiveVector, control: $0.control) }) else { return }
        interruptsSent.add(1, ordering: .relaxed)
        deliver(m)
    }

    public func configWritten(function: RequesterID, offset: Int, size: Int, config: inout PCIConfigSpace) -> [RequesterID: PCIConfigSpace]? {
        let bar = PCIConfigSpace.bar0 + 4 * Self.registerBAR
        if offset < bar + 4 && bar < offset + size {
            let sizing = ~(Self.barSize - 1)
            if config.read32(bar) != sizing { config.set32(bar, UInt32(registerPage)) }
        }
        let released: [MSIX.Message] = state.withLock { s in
            guard s.msix.covers(offset, size: size) else { return [] }
            s.control = s.msix.control(config)
            return s.msix.releasePending(control: s.control)
        }
        send(released)
        return nil
    }

    public func barRead(function: RequesterID, bar: Int, offset: UInt64, size: UInt8, config: PCIConfigSpace) -> UInt64 {
        guard bar == Self.msixBAR else { return 0 }
        return state.withLock { $0.msix.read(offset: offset, size: size) }
    }

    public func barWrite(function: RequesterID, bar: Int, offset: UInt64, size: UInt8, value: UInt64, config: PCIConfigSpace) {
        guard bar == Self.msixBAR else { return }
        let released: [MSIX.Message] = state.withLock { s in
            s.msix.write(offset: offset, size: size, value: value)
            return s.msix.releasePending(control: s.control)
        }
        send(released)
    }

    private func send(_ messages: [MSIX.Message]) {
        for m in messages {
            interruptsSent.add(1, ordering: .relaxed)
            deliver(m)
        }
    }
}
