import GuestImages
#if canImport(Glibc)
import Glibc
#endif

public enum GuestProgramError: Error, Equatable, CustomStringConvertible {
    case notFound(String)
    case unreadable(path: String, errno: Int32)
    case invalid(source: String, ELFLoadError)

    public var description: String {
        switch self {
        case let .notFound(name):
            let names = BundledGuests.all.filter { !$0.isTestGuest }.map(\.name).joined(separator: ", ")
            return "no bundled guest named '\(name)' and no such file (bundled guests: \(names))"
        case let .unreadable(path, err): return "cannot read \(path): \(String(cString: strerror(err)))"
        case let .invalid(source, error): return "\(source): \(error)"
        }
    }
}

/// Resolves what the user asked to run: a bundled guest's name or a path to an ELF file.
public enum GuestProgram {
    public static func load(_ nameOrPath: String) throws(GuestProgramError) -> ELFImage {
        let bytes: [UInt8]
        if let bundled = BundledGuests.named(nameOrPath), !nameOrPath.contains("/") {
            bytes = bundled.elf
        } else if access(nameOrPath, F_OK) == 0 {
            bytes = try readFile(nameOrPath)
        } else {
            throw .notFound(nameOrPath)
        }
        do {
            return try ELFImage(bytes: bytes)
        } catch {
            throw .invalid(source: nameOrPath, error)
        }
    }

    static func readFile(_ path: String) throws(GuestProgramError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .unreadable(path: path, errno: errno) }
        defer { close(fd) }
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw .unreadable(path: path, errno: errno)
            }
            if n == 0 { break }
            result.append(contentsOf: chunk[0..<n])
            if result.count > 256 << 20 { throw .unreadable(path: path, errno: EFBIG) }
        }
        return result
    }
}
