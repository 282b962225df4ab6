import Foundation
import PackagePlugin

/// Builds the freestanding guests under `Guests/` with the toolchain's clang and ld.lld
/// and embeds them in the target as generated Swift (base64 string literals).
@main
struct GuestBuildPlugin: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let guests = context.package.directoryURL.appending(path: "Guests")
        let output = context.pluginWorkDirectoryURL.appending(path: "GeneratedGuests.swift")
        let objects = context.pluginWorkDirectoryURL.appending(path: "objects")
        var arguments = ["--guests", guests.path(), "--work", objects.path(), "--output", output.path()]
        // The toolchain's own clang/ld.lld when SwiftPM can name them; GuestBuilder
        // searches next to swiftc and on PATH otherwise.
        if let clang = try? context.tool(named: "clang") { arguments += ["--clang", clang.url.path()] }
        if let lld = try? context.tool(named: "ld.lld") { arguments += ["--lld", lld.url.path()] }
        return [.buildCommand(
            displayName: "Building guests in Guests/",
            executable: try context.tool(named: "GuestBuilder").url,
            arguments: arguments,
            inputFiles: Self.files(under: guests),
            outputFiles: [output])]
    }

    static func files(under directory: URL) -> [URL] {
        guard let e = FileManager.default.enumerator(at: directory, includingPropertiesForKeys: [.isRegularFileKey]) else { return [] }
        return e.compactMap { $0 as? URL }.filter { (try? $0.resourceValues(forKeys: [.isRegularFileKey]).isRegularFile) == true }
            .sorted { $0.path() < $1.path() }
    }
}
