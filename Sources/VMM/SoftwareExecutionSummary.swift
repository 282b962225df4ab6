import X86Emulator

/// How the software engine ran a machine's guest code (for `run --stats`).
public struct SoftwareExecutionSummary: Sendable {
    public var instructions: UInt64
    public var interpreted: UInt64
    public var blocksTranslated: UInt64
    public var translating: Bool

    public var translatedShare: Double { instructions == 0 ? 0 : 1 - Double(min(interpreted, instructions)) / Double(instructions) }

    public var text: String {
        guard translating else {
            return "software engine: \(instructions) guest instructions, all interpreted"
                + (SoftwareEngine.translationSupported ? "" : " (this host lacks BMI2, which translated code needs)")
        }
        return "software engine: \(instructions) guest instructions, "
            + String(format: "%.2f %%", translatedShare * 100) + " as translated code (\(blocksTranslated) blocks), \(interpreted) interpreted"
    }
}

extension Machine {
    /// nil unless the machine runs on the software engine.
    public var softwareExecutionSummary: SoftwareExecutionSummary? {
        let cpus = allVCPUs.compactMap { $0 as? SoftwareVirtualCPU }
        guard !cpus.isEmpty else { return nil }
        return SoftwareExecutionSummary(instructions: cpus.reduce(0) { $0 &+ $1.instructionsRetired },
                                        interpreted: cpus.reduce(0) { $0 &+ $1.instructionsInterpreted },
                                        blocksTranslated: cpus.reduce(0) { $0 &+ $1.blocksTranslated },
                                        translating: cpus.contains { $0.usesTranslation })
    }
}
