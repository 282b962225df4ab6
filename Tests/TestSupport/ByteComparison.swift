#if canImport(Glibc)
import Glibc
#endif

/// Whether two byte arrays are equal, compared with memcmp: `==` on [UInt8] goes element by
/// element in a debug build, too slow for the fuzz loops' whole-RAM and whole-file checks.
public func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    a.count == b.count && a.withUnsafeBytes { x in b.withUnsafeBytes { y in x.count == 0 || memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0 } }
}
