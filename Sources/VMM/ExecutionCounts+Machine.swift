import VirtCore

extension ExecutionCounts {
    /// One line for `run --stats`: how the engine ran the guest's instructions.
    public var text: String {
        guard translating else {
            return "software engine: \(instructions) guest instructions, all interpreted"
                + (EngineSelection.softwareEngineTranslates ? "" : " (this host lacks BMI2, which translated code needs)")
        }
        return "software engine: \(instructions) guest instructions, "
            + "\((translatedShare * 100).fixed(2)) %" + " as translated code (\(blocksTranslated) blocks), \(interpreted) interpreted"
    }
}

extension Machine {
    /// All vCPUs' instruction counts, or nil when the engine does not count instructions.
    public var executionCounts: ExecutionCounts? {
        let counters = allVCPUs.compactMap { $0 as? any InstructionCounting }
        guard !counters.isEmpty else { return nil }
        return counters.reduce(ExecutionCounts()) { $0 + $1.executionCounts }
    }
}
