// swift-tools-version:6.0
import PackageDescription

// Layering (see ../shared/DESIGN.md):
//   swiftvisor → VMM → (Devices, KVMEngine, X86Emulator) → VirtCore → CHost; KVMEngine → CKVM
// Devices never import an engine; engines never import devices.
let package = Package(
    name: "Swiftvisor",
    platforms: [.macOS(.v15)],  // Synchronization (Mutex, Atomic); the engines themselves need Linux
    products: [
        .executable(name: "swiftvisor", targets: ["swiftvisor"]),
        .executable(name: "swiftvisor-api", targets: ["swiftvisor-api"]),
        .library(name: "SwiftvisorKit", targets: ["SwiftvisorKit"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // Attestation reports (P-384) of confidential VMs.
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // C shim: <linux/kvm.h>, memfd, userfaultfd, ioctl wrappers and the reference C run loop.
        .target(name: "CKVM"),
        // C shim for host facilities that are not KVM: memfd, eventfd, userfaultfd, TSC, threads.
        .target(name: "CHost"),
        .target(name: "VirtCore", dependencies: ["CHost"]),
        .target(name: "KVMEngine", dependencies: ["VirtCore", "CKVM", "CHost"]),
        .target(name: "X86Emulator", dependencies: ["VirtCore", "CHost"]),
        .target(name: "Devices", dependencies: ["VirtCore"]),
        // Freestanding C guests under Guests/, compiled by the build-tool plugin and embedded.
        .executableTarget(name: "GuestBuilder", path: "Sources/GuestBuilder"),
        .plugin(name: "GuestBuildPlugin", capability: .buildTool(), dependencies: ["GuestBuilder"]),
        .target(name: "GuestImages", plugins: ["GuestBuildPlugin"]),
        .target(name: "VMM", dependencies: ["CHost", "VirtCore", "KVMEngine", "X86Emulator", "Devices", "GuestImages"]),
        // Confidential VMs' attestation reports (P-384). Not in VMM: swift-crypto imports Foundation on
        // Linux, which `swiftvisor` must not link (start-up cost); swiftvisor-api carries out what needs it.
        .target(name: "Attestation", dependencies: ["VMM", "VirtCore", .product(name: "Crypto", package: "swift-crypto")]),
        // The operator's HTTP/1.1 + JSON API on a Unix socket (SwiftNIO), its client, and Prometheus metrics.
        .target(name: "OperatorAPI", dependencies: [
            "VMM", "VirtCore", "Devices", "GuestImages",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        .target(name: "SwiftvisorKit", dependencies: ["VMM", "Attestation", "VirtCore", "Devices", "GuestImages"]),
        // Experiments reproducing the source text's scenarios; tables, JSON and SVG charts.
        .target(name: "Lab", dependencies: ["VMM", "Devices", "VirtCore", "GuestImages", "X86Emulator"]),
        // The command-line tool's commands, parsed alike by its two executables.
        .target(name: "SwiftvisorCLI", dependencies: [
            "VMM", "Lab", "GuestImages",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], path: "Sources/swiftvisor"),
        // `swiftvisor`, without the operator API's libraries (their start-up cost): it hands serve,
        // ctl, migrate, balloon, snapshot create and runs with --api-sock to swiftvisor-api, from
        // the same directory, by exec. (No target dependency on it: SwiftPM would link its libraries.)
        // A static executable (an executable's own setting; packages that depend on this one never
        // build it): no dynamic loader, no relocations or symbol lookups at start-up, and only the
        // parts of libc/libstdc++ it uses, not their whole mapped text. lld puts the functions
        // `run hello` executes together (startup-order.txt, Scripts/startup-order.sh) where they
        // have sections of their own (-function-sections), so the kernel's 64 KiB fault-around
        // maps few other code pages.
        .executableTarget(name: "swiftvisor", dependencies: ["SwiftvisorCLI"], path: "Sources/SwiftvisorTool",
                          exclude: ["startup-order.txt"],
                          linkerSettings: [.unsafeFlags(["-static-executable", "-use-ld=lld",
                                                         "-Xlinker", "--symbol-ordering-file=\(Context.packageDirectory)/Sources/SwiftvisorTool/startup-order.txt",
                                                         "-Xlinker", "--no-warn-symbol-ordering"], .when(platforms: [.linux])),
                                           // FoundationEssentials' own parts, which only -static-stdlib names to the linker.
                                           .linkedLibrary("_FoundationCollections", .when(platforms: [.linux])),
                                           .linkedLibrary("_FoundationCShims", .when(platforms: [.linux]))]),
        .executableTarget(name: "swiftvisor-api", dependencies: [
            "SwiftvisorCLI", "OperatorAPI", "Attestation", "VMM", "VirtCore",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // Helpers the test targets share: host engines, serial capture, running a guest, seeded generators.
        .target(name: "TestSupport", dependencies: ["VMM", "VirtCore", "Devices", "GuestImages"], path: "Tests/TestSupport"),
        .testTarget(name: "VirtCoreTests", dependencies: ["VirtCore"]),
        .testTarget(name: "KVMEngineTests", dependencies: ["KVMEngine", "VirtCore", "GuestImages", "VMM", "TestSupport"]),
        .testTarget(name: "X86EmulatorTests", dependencies: ["X86Emulator", "VirtCore", "VMM", "KVMEngine", "TestSupport"],
                    exclude: ["RandomSequenceRegressions.txt"]),  // read from the source tree, appended to by the tests
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "VirtCore", "TestSupport"]),
        // Every bundled guest on both engines: output, exits, registers, RAM.
        .testTarget(name: "DifferentialTests", dependencies: ["VMM", "KVMEngine", "X86Emulator", "VirtCore", "GuestImages", "Devices", "TestSupport"]),
        // Runs the built `swiftvisor` executable as a user would.
        .testTarget(name: "CLITests", dependencies: ["TestSupport", "OperatorAPI", "SwiftvisorCLI"]),
        .testTarget(name: "LabTests", dependencies: ["Lab", "VMM", "VirtCore", "TestSupport"]),
        // kvm-unit-tests built from its source and run on the PC platform (skipped without it).
        .testTarget(name: "ThirdPartyGuestTests", dependencies: ["TestSupport", "Lab", "VMM", "VirtCore"]),
        .testTarget(name: "OperatorAPITests", dependencies: ["OperatorAPI", "VMM", "VirtCore", "Devices", "TestSupport"]),
        .testTarget(name: "VMMTests", dependencies: ["VMM", "Attestation", .product(name: "Crypto", package: "swift-crypto"), "OperatorAPI", "GuestImages", "KVMEngine", "X86Emulator", "Devices", "VirtCore", "TestSupport"]),
    ]
)
