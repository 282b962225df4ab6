import CHost

/// The vCPU the calling thread runs, for a device whose clock is the accessing vCPU's
/// (the 8254: its count follows the reading vCPU's TSC on the software engine).
enum VCPUThread {
    /// Called once by each vCPU thread before it runs guest code.
    static func enter(vcpu: Int) { host_set_current_vcpu(Int32(vcpu)) }

    /// nil on a thread that runs no vCPU (a snapshot or a test reading a paused machine).
    static var current: Int? {
        let id = host_current_vcpu()
        return id < 0 ? nil : Int(id)
    }
}
