import Foundation
import Glibc

/// Runs `executable` with standard input empty and standard output and error into one
/// pipe, to its end: its exit status and all it printed.
public func runToCompletion(_ executable: String, _ arguments: [String],
                            environment: [String: String]? = nil) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = arguments
    if let environment { p.environment = environment }
    let out = Pipe()
    p.standardOutput = out
    p.standardError = out
    p.standardInput = FileHandle.nullDevice
    try p.run()
    let text = String(decoding: out.fileHandleForReading.readToEndRetrying(), as: UTF8.self)
    p.waitUntilExit()
    return (p.terminationStatus, text)
}

extension FileHandle {
    /// Everything to the end of the file, retrying reads a signal interrupts: Foundation's
    /// `readDataToEndOfFile` and `availableData` trap on EINTR, and a test process whose
    /// children exit (SIGCHLD) and whose KVM vCPUs are kicked (SIGUSR1) sees signals.
    public func readToEndRetrying() -> Data {
        var all = Data()
        while true {
            let chunk = readSomeRetrying()
            if chunk.isEmpty { return all }
            all += chunk
        }
    }

    /// The bytes available now, waiting for at least one; empty at the end of the file (or
    /// on an error other than EINTR).
    public func readSomeRetrying() -> Data {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fileDescriptor, $0.baseAddress, $0.count) }
            if n >= 0 { return Data(buffer[0..<n]) }
            if errno != EINTR { return Data() }
        }
    }
}
