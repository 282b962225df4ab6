/// A saved device state that cannot be restored: it names a shape the device cannot take
/// (a corrupt or foreign snapshot). The device keeps the state it had.
public struct DeviceStateError: Error, CustomStringConvertible, Equatable, Sendable {
    public let device: String
    public let problem: String
    public init(device: String, _ problem: String) {
        self.device = device
        self.problem = problem
    }
    public var description: String { "\(device): saved state cannot be restored (\(problem))" }
}
