// swift-tools-version:6.0
import PackageDescription

// Swiftvisor used as a library from another package: `swift run` boots a bundled guest,
// reads its serial output, pauses it and takes a snapshot.
let package = Package(
    name: "Embed",
    platforms: [.macOS(.v15)],
    dependencies: [.package(name: "Swiftvisor", path: "../..")],
    targets: [
        .executableTarget(name: "Embed", dependencies: [.product(name: "SwiftvisorKit", package: "Swiftvisor")]),
    ]
)
