#if canImport(Glibc)
import Glibc
#endif

extension sockaddr_un {
    /// The address of the Unix socket at `path`; nil when the path (with its NUL) does not
    /// fit `sun_path` (108 bytes on Linux).
    public static func forPath(_ path: String) -> sockaddr_un? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }
}
