/// Function 00:00.0, the host bridge itself as software sees it in configuration space:
/// Intel's Q35 MCH ID (8086:29C0), class "host bridge". No BARs, no side effects. Linux's
/// mechanism-#1 probe looks for a host bridge on bus 0 before it trusts the ports.
public final class PCIHostBridgeFunction: PCIDevice {
    public static let vendorID: UInt16 = 0x8086, deviceID: UInt16 = 0x29C0
    public static let classCode: UInt32 = 0x06_0000

    public var name: String { "host-bridge" }
    public let configuration = PCIConfigSpace(vendor: vendorID, device: deviceID, classCode: classCode)

    public init() {}

    public func configWritten(function: RequesterID, offset: Int, size: Int, config: inout PCIConfigSpace) -> [RequesterID: PCIConfigSpace]? { nil }
    public func barRead(function: RequesterID, bar: Int, offset: UInt64, size: UInt8, config: PCIConfigSpace) -> UInt64 { 0 }
    public func barWrite(function: RequesterID, bar: Int, offset: UInt64, size: UInt8, value: UInt64, config: PCIConfigSpace) {}
}
