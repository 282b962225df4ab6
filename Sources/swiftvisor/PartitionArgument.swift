import ArgumentParser
import VMM

/// `--partition VM:CPUS[,fifo=P][,mlock]`: VM N's vCPU threads pinned to host CPUs CPUS
/// (comma-free list with '+', e.g. 0+1), at SCHED_FIFO priority P, its RAM locked.
struct PartitionArgument {
    var vm: Int
    var policy: PartitionPolicy

    init(_ text: String) throws {
        let parts = text.split(separator: ",").map(String.init)
        guard let head = parts.first, let colon = head.firstIndex(of: ":"), let vm = Int(head[..<colon]), vm >= 0 else {
            throw ValidationError("--partition \(text): expected VM:CPUS[,fifo=P][,mlock], e.g. 0:1,fifo=80,mlock")
        }
        let cpus = head[head.index(after: colon)...].split(separator: "+").map { Int($0) }
        guard !cpus.isEmpty, cpus.allSatisfy({ ($0 ?? -1) >= 0 }) else {
            throw ValidationError("--partition \(text): CPUS is a list of host CPU numbers joined by '+', e.g. 1 or 0+1")
        }
        self.vm = vm
        policy = PartitionPolicy(cpus: cpus.compactMap { $0 })
        for option in parts.dropFirst() {
            if option == "mlock" {
                policy.lockMemory = true
            } else if option.hasPrefix("fifo="), let p = Int32(option.dropFirst(5)) {
                policy.fifoPriority = p
            } else {
                throw ValidationError("unknown --partition option '\(option)' (use fifo=P or mlock)")
            }
        }
    }
}
