// GuestBuilder: compiles Guests/runtime and each Guests/<name>/ into a static ELF with
// clang + ld.lld, and writes a Swift file embedding them (run by GuestBuildPlugin).
import Foundation

struct BuildFailure: Error, CustomStringConvertible {
    let description: String
}

struct Options {
    var guests = ""
    var work = ""
    var output = ""
    var clang: String?
    var lld: String?

    init(_ args: [String]) throws {
        var i = 0
        func value() throws -> String {
            i += 1
            guard i < args.count else { throw BuildFailure(description: "missing value for \(args[i - 1])") }
            return args[i]
        }
        while i < args.count {
            switch args[i] {
            case "--guests": guests = try value()
            case "--work": work = try value()
            case "--output": output = try value()
            case "--clang": clang = try value()
            case "--lld": lld = try value()
            default: throw BuildFailure(description: "unknown argument \(args[i])")
            }
            i += 1
        }
        guard !guests.isEmpty, !work.isEmpty, !output.isEmpty else {
            throw BuildFailure(description: "usage: GuestBuilder --guests DIR --work DIR --output FILE [--clang PATH] [--lld PATH]")
        }
    }
}

/// Finds a toolchain program: the given path, then next to swiftc/swift on PATH, then PATH.
func findTool(_ name: String, given: String?) throws -> String {
    let fm = FileManager.default
    if let given, fm.isExecutableFile(atPath: given) { return given }
    let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
    let dirs = path.split(separator: ":").map(String.init)
    for d in dirs where fm.isExecutableFile(atPath: d + "/swiftc") && fm.isExecutableFile(atPath: d + "/" + name) {
        return d + "/" + name
    }
    for d in dirs + ["/opt/swift/usr/bin", "/usr/bin"] where fm.isExecutableFile(atPath: d + "/" + name) {
        return d + "/" + name
    }
    throw BuildFailure(description: "cannot find '\(name)': install a Swift toolchain that ships clang and ld.lld, or put them on PATH")
}

@discardableResult
func run(_ tool: String, _ args: [String]) throws -> String {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: tool)
    p.arguments = args
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    try p.run()
    let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    guard p.terminationStatus == 0 else {
        throw BuildFailure(description: "\((tool as NSString).lastPathComponent) failed:\n\(out)")
    }
    return out
}

let cflags = ["-target", "x86_64-unknown-none-elf", "-O2", "-ffreestanding", "-fno-pic", "-mno-red-zone",
              "-mgeneral-regs-only", "-nostdlib", "-fno-stack-protector", "-fno-builtin", "-Wall", "-Werror", "-std=c11"]

func sources(in dir: String) throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: dir)
        .filter { $0.hasSuffix(".c") || $0.hasSuffix(".S") }.sorted().map { dir + "/" + $0 }
}

/// `usesSSE`: the guest's sources say `// uses-sse`; the compiler may then use x87/SSE/SSE2
/// (the x86-64 baseline) instead of general-purpose registers only.
func compile(_ files: [String], clang: String, include: String, into dir: String, prefix: String, usesSSE: Bool = false) throws -> [String] {
    try files.map { src in
        let obj = dir + "/" + prefix + "-" + (src as NSString).lastPathComponent + ".o"
        let flags = usesSSE ? cflags.filter { $0 != "-mgeneral-regs-only" } + ["-msse2", "-mno-sse3"] : cflags
        try run(clang, flags + ["-I", include, "-c", src, "-o", obj])
        return obj
    }
}

/// `// summary: …` and `// test-guest` lines of a guest's sources.
func metadata(_ files: [String]) throws -> (summary: String, isTest: Bool, usesSSE: Bool) {
    var summary = "", isTest = false, usesSSE = false
    for f in files {
        for line in try String(contentsOfFile: f, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false).prefix(10) {
            let t = line.trimmingCharacters(in: .whitespaces)
            if t.hasPrefix("// summary:") { summary = String(t.dropFirst("// summary:".count)).trimmingCharacters(in: .whitespaces) }
            if t == "// test-guest" { isTest = true }
            if t == "// uses-sse" { usesSSE = true }
        }
    }
    return (summary, isTest, usesSSE)
}

func swiftLiteral(_ s: String) -> String {
    "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
}

do {
    let o = try Options(Array(CommandLine.arguments.dropFirst()))
    let clang = try findTool("clang", given: o.clang)
    let lld = try findTool("ld.lld", given: o.lld)
    let fm = FileManager.default
    try fm.createDirectory(atPath: o.work, withIntermediateDirectories: true)
    let runtimeDir = o.guests + "/runtime"
    let runtimeObjects = try compile(sources(in: runtimeDir), clang: clang, include: runtimeDir, into: o.work, prefix: "runtime")
    let names = try fm.contentsOfDirectory(atPath: o.guests).filter { name in
        var isDir: ObjCBool = false
        return name != "runtime" && !name.hasPrefix(".") && fm.fileExists(atPath: o.guests + "/" + name, isDirectory: &isDir) && isDir.boolValue
    }.sorted()
    var entries: [String] = []
    for name in names {
        let files = try sources(in: o.guests + "/" + name)
        guard !files.isEmpty else { continue }
        let meta = try metadata(files)
        let objects = try compile(files, clang: clang, include: runtimeDir, into: o.work, prefix: name, usesSSE: meta.usesSSE)
        let elf = o.work + "/" + name + ".elf"
        try run(lld, ["-static", "-nostdlib", "-T", runtimeDir + "/guest.ld", "-o", elf] + runtimeObjects + objects)
        let bytes = try Data(contentsOf: URL(fileURLWithPath: elf))
        entries.append("    BundledGuest(name: \(swiftLiteral(name)), summary: \(swiftLiteral(meta.summary)), isTestGuest: \(meta.isTest),\n                 base64: \"\(bytes.base64EncodedString())\"),")
    }
    let swift = "// Generated by GuestBuilder from Guests/. Do not edit.\n\nlet generatedGuests: [BundledGuest] = [\n" + entries.joined(separator: "\n") + "\n]\n"
    try swift.write(toFile: o.output, atomically: true, encoding: .utf8)
} catch {
    FileHandle.standardError.write(Data("error: GuestBuilder: \(error)\n".utf8))
    exit(1)
}
