import VMM

// The JSON bodies of the operator API (docs/api/swiftvisor.yaml). Keys are snake_case on the
// wire: every encoder and decoder here converts (`APIJSON`).

/// `GET /`: what the instance is and does.
public struct InstanceInfo: Codable, Sendable, Equatable {
    /// "Not started", "Running", "Paused" or "Stopped".
    public var state: String
    public var engine: String?
    public var vcpus: Int
    public var memoryBytes: UInt64
    public var guest: String?
    /// Seconds since the VM started (0 before InstanceStart).
    public var uptimeSeconds: Double
    /// Why the VM stopped, once it has.
    public var stopReason: String?
}

/// `PATCH /vm`.
public struct VMStateRequest: Codable, Sendable {
    /// "Paused" or "Resumed".
    public var state: String
    public init(state: String) { self.state = state }
}

/// `PUT /actions`.
public struct ActionRequest: Codable, Sendable {
    /// "InstanceStart" or "Stop".
    public var actionType: String
    public init(actionType: String) { self.actionType = actionType }
}

/// `PUT /machine-config` (before InstanceStart).
public struct MachineConfigRequest: Codable, Sendable, Equatable {
    public var vcpuCount: Int?
    public var memSizeMib: UInt64?
    /// "kvm" or "software"; absent: KVM when usable, else software.
    public var engine: String?
    /// Software engine: false interprets every instruction.
    public var translation: Bool?
    public init(vcpuCount: Int? = nil, memSizeMib: UInt64? = nil, engine: String? = nil, translation: Bool? = nil) {
        self.vcpuCount = vcpuCount; self.memSizeMib = memSizeMib; self.engine = engine; self.translation = translation
    }
}

/// `PUT /boot-source` (before InstanceStart).
public struct BootSourceRequest: Codable, Sendable, Equatable {
    /// A bundled guest's name or the path of a static ELF64 executable.
    public var guest: String
    public var bootArgs: String?
    public init(guest: String, bootArgs: String? = nil) { self.guest = guest; self.bootArgs = bootArgs }
}

/// `PUT /drives/{id}` (before InstanceStart).
public struct DriveRequest: Codable, Sendable, Equatable {
    public var driveId: String?
    public var pathOnHost: String
    public var isReadOnly: Bool?
    public init(pathOnHost: String, isReadOnly: Bool? = nil) { self.pathOnHost = pathOnHost; self.isReadOnly = isReadOnly }
}

/// `PUT /network-interfaces/{id}` (before InstanceStart).
public struct NetworkInterfaceRequest: Codable, Sendable, Equatable {
    public var ifaceId: String?
    /// `switch:NAME` or `tap:IFNAME`.
    public var attachment: String
    public init(attachment: String) { self.attachment = attachment }
}

/// `PUT /balloon` (before InstanceStart) and `PATCH /balloon`.
public struct BalloonRequest: Codable, Sendable {
    public var amountMib: UInt32?
    /// The target in 4 KiB pages instead of MiB.
    public var targetPages: UInt32?
    public init(amountMib: UInt32? = nil, targetPages: UInt32? = nil) { self.amountMib = amountMib; self.targetPages = targetPages }
}

/// `GET /balloon`.
public struct BalloonInfo: Codable, Sendable, Equatable {
    public var targetPages: UInt32
    public var actualPages: UInt32
    public var amountMib: UInt32
    /// The VM's RAM as the host holds it now.
    public var hostBytes: UInt64
}

/// `GET /balloon/statistics`: the device's counters and, once the driver reported them, the guest's.
public struct BalloonStatisticsInfo: Codable, Sendable, Equatable {
    public var targetPages: UInt32
    public var actualPages: UInt32
    public var inflatedPages: UInt64
    public var deflatedPages: UInt64
    public var discardedBytes: UInt64
    public var returnedBytes: UInt64
    public var rejectedPages: UInt64
    public var freeMemory: UInt64?
    public var totalMemory: UInt64?
    public var availableMemory: UInt64?
}

/// `PUT /snapshot/create`.
public struct SnapshotCreateRequest: Codable, Sendable {
    public var snapshotPath: String
    public var note: String?
    public init(snapshotPath: String, note: String? = nil) { self.snapshotPath = snapshotPath; self.note = note }
}

/// `PUT /snapshot/load` (before InstanceStart): the VM becomes the snapshot's.
public struct SnapshotLoadRequest: Codable, Sendable {
    public var snapshotPath: String
    /// Fill RAM on first touch (userfaultfd) instead of reading it all first.
    public var lazy: Bool?
    /// Start the VM at once (otherwise InstanceStart starts it).
    public var resumeVm: Bool?
    public init(snapshotPath: String, lazy: Bool? = nil, resumeVm: Bool? = nil) {
        self.snapshotPath = snapshotPath; self.lazy = lazy; self.resumeVm = resumeVm
    }
}

/// `PUT /migrate`: answered with one JSON object per line (`MigrationControlLine`): progress,
/// then the result.
public struct MigrateRequest: Codable, Sendable {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    public var destination: String
    public var postcopy: Bool?
    public var autoConverge: Bool?
    public var maxDowntimeMs: Double?
    public var maxRounds: Int?
    public var timeoutS: Double?
    /// Reconnect a post-copy migration that broke after the switch-over (`migrate --resume`).
    public var resume: Bool?
    public init(destination: String, postcopy: Bool? = nil, autoConverge: Bool? = nil, maxDowntimeMs: Double? = nil,
                maxRounds: Int? = nil, timeoutS: Double? = nil, resume: Bool? = nil) {
        self.destination = destination; self.postcopy = postcopy; self.autoConverge = autoConverge
        self.maxDowntimeMs = maxDowntimeMs; self.maxRounds = maxRounds; self.timeoutS = timeoutS
        self.resume = resume
    }

    /// The address and options, validated.
    public func parsed() throws(MigrationError) -> (MigrationAddress, MigrationOptions) {
        let address = try MigrationAddress(parsing: destination)
        var options = MigrationOptions()
        options.postcopy = postcopy ?? false
        options.autoConverge = autoConverge ?? false
        options.resume = resume ?? false
        if let maxDowntimeMs { try options.setMaxDowntime(milliseconds: maxDowntimeMs) }
        if let maxRounds { try options.setMaxRounds(maxRounds) }
        if let timeoutS { try options.setTimeout(seconds: timeoutS) }
        return (address, options)
    }
}

/// Every error answer: `{"fault_message": "…"}`.
public struct APIFault: Codable, Sendable, Equatable, Error {
    public var faultMessage: String
    public init(faultMessage: String) { self.faultMessage = faultMessage }
}
