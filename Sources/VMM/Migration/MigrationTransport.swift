import Dispatch
import FoundationEssentials
import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// Where a migration goes: `tcp:HOST:PORT` (HOST a name, an IPv4 address or a bracketed
/// IPv6 address) or `unix:PATH`.
public enum MigrationAddress: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(path: String)

    public init(parsing text: String) throws(MigrationError) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty, path.utf8.count < 108 else { throw .badAddress(text) }
            self = .unix(path: path)
            return
        }
        guard text.hasPrefix("tcp:"), let colon = text.lastIndex(of: ":"), colon > text.index(text.startIndex, offsetBy: 3),
              let port = UInt16(text[text.index(after: colon)...]) else { throw .badAddress(text) }
        var host = String(text[text.index(text.startIndex, offsetBy: 4)..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { throw .badAddress(text) }
        self = .tcp(host: host, port: port)
    }

    public var description: String {
        switch self {
        case let .tcp(host, port): return host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
        case let .unix(path): return "unix:\(path)"
        }
    }

    /// Resolved socket addresses (TCP: every address of the host; Unix: the path).
    func socketAddresses() throws(MigrationError) -> [(family: Int32, address: [UInt8])] {
        switch self {
        case let .unix(path):
            // A path longer than sun_path is refused, never truncated or overrun.
            guard let addr = sockaddr_un.forPath(path) else { throw .badAddress(description) }
            return [(AF_UNIX, withUnsafeBytes(of: addr) { Array($0) })]
        case let .tcp(host, port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_family = AF_UNSPEC
            var list: UnsafeMutablePointer<addrinfo>?
            guard getaddrinfo(host, String(port), &hints, &list) == 0, let first = list else {
                throw .badAddress(description)
            }
            defer { freeaddrinfo(first) }
            var result: [(Int32, [UInt8])] = []
            var p: UnsafeMutablePointer<addrinfo>? = first
            while let a = p {
                result.append((a.pointee.ai_family, Array(UnsafeRawBufferPointer(start: a.pointee.ai_addr, count: Int(a.pointee.ai_addrlen)))))
                p = a.pointee.ai_next
            }
            return result
        }
    }
}

/// One connected stream socket with send and receive timeouts.
// SAFETY: used by one thread at a time (handed from the accepting thread to the receiver
// through a locked queue); `shutdownNow` may come from any thread, as shutdown(2) allows.
final class MigrationConnection: @unchecked Sendable {
    let fd: Int32
    let peer: String

    init(fd: Int32, peer: String, timeoutSeconds: Double) {
        self.fd = fd
        self.peer = peer
        var tv = timeval(tv_sec: Int(timeoutSeconds), tv_usec: Int((timeoutSeconds - Double(Int(timeoutSeconds))) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var buffer: Int32 = 4 << 20
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buffer, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit { Glibc.close(fd) }

    /// Connects to `address`, trying each resolved address in turn.
    static func connect(to address: MigrationAddress, timeoutSeconds: Double) throws(MigrationError) -> MigrationConnection {
        var lastErrno: Int32 = ECONNREFUSED
        for (family, bytes) in try address.socketAddresses() {
            let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { lastErrno = errno; continue }
            let rc = bytes.withUnsafeBytes { raw in
                Glibc.connect(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(raw.count))
            }
            if rc == 0 { return MigrationConnection(fd: fd, peer: address.description, timeoutSeconds: timeoutSeconds) }
            lastErrno = errno
            Glibc.close(fd)
        }
        throw .socketFailed(operation: "connect to", address: address.description, errno: lastErrno)
    }

    func send(_ bytes: [UInt8]) throws(MigrationError) {
        var done = 0
        var failure: Int32 = 0
        bytes.withUnsafeBytes { raw in
            while done < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
                if n < 0 {
                    if errno == EINTR { continue }
                    failure = errno
                    return
                }
                done += n
            }
        }
        switch failure {
        case 0: return
        case EAGAIN: throw .timedOut(expecting: "the peer to take more data")
        case EPIPE, ECONNRESET: throw .connectionClosed(expecting: "the peer to take more data")
        default: throw .socketFailed(operation: "send to", address: peer, errno: failure)
        }
    }

    /// Exactly `count` bytes; a short stream is `connectionClosed`.
    func receive(_ count: Int, expecting: String) throws(MigrationError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var failure: MigrationError?
        bytes.withUnsafeMutableBytes { raw in
            do throws(MigrationError) { try receive(into: raw.baseAddress ?? UnsafeMutableRawPointer(bitPattern: 1)!, count: count, expecting: expecting) } catch {
                failure = error
            }
        }
        if let failure { throw failure }
        return bytes
    }

    /// Exactly `count` bytes into `buffer`; a short stream is `connectionClosed`.
    func receive(into buffer: UnsafeMutableRawPointer, count: Int, expecting: String) throws(MigrationError) {
        var done = 0
        while done < count {
            let n = recv(fd, buffer + done, count - done, 0)
            if n > 0 { done += n; continue }
            if n < 0 && errno == EINTR { continue }
            switch n == 0 ? -1 : errno {
            case -1, ECONNRESET: throw .connectionClosed(expecting: expecting)
            case EAGAIN: throw .timedOut(expecting: expecting)
            case let failure: throw .socketFailed(operation: "receive from", address: peer, errno: failure)
            }
        }
    }

    /// Stops both directions now (another thread's blocked send or receive returns).
    func shutdownNow() { Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
}

/// A listening socket for incoming migrations. `accept` hands out one connection at a time.
final class MigrationListeningSocket: @unchecked Sendable {
    // SAFETY: fd is immutable; close() is guarded by an atomic flag.
    let fd: Int32
    let address: MigrationAddress
    private let closed = Atomic<Bool>(false)

    init(address requested: MigrationAddress) throws(MigrationError) {
        var lastErrno: Int32 = EADDRNOTAVAIL
        if case let .unix(path) = requested { unlink(path) }
        for (family, bytes) in try requested.socketAddresses() {
            let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { lastErrno = errno; continue }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            let rc = bytes.withUnsafeBytes { raw in
                bind(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(raw.count))
            }
            guard rc == 0, listen(fd, 8) == 0 else { lastErrno = errno; Glibc.close(fd); continue }
            self.fd = fd
            address = Self.boundAddress(fd: fd, requested: requested)
            return
        }
        throw .socketFailed(operation: "listen on", address: requested.description, errno: lastErrno)
    }

    deinit { close() }

    /// The address with the port the kernel chose when 0 was asked for.
    private static func boundAddress(fd: Int32, requested: MigrationAddress) -> MigrationAddress {
        guard case let .tcp(host, _) = requested else { return requested }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) == 0 }
        }
        guard ok else { return requested }
        let port: UInt16 = withUnsafeBytes(of: storage) { raw in
            // sin_port and sin6_port both sit at offset 2, in network order.
            UInt16(raw[2]) << 8 | UInt16(raw[3])
        }
        return .tcp(host: host, port: port)
    }

    /// The next connection, or nil once closed.
    func accept(timeoutSeconds: Double) -> MigrationConnection? {
        while !closed.load(ordering: .acquiring) {
            let c = Glibc.accept(fd, nil, nil)
            if c >= 0 {
                _ = fcntl(c, F_SETFD, FD_CLOEXEC)
                return MigrationConnection(fd: c, peer: "incoming connection", timeoutSeconds: timeoutSeconds)
            }
            if errno == EINTR || errno == ECONNABORTED { continue }
            return nil
        }
        return nil
    }

    func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        Glibc.shutdown(fd, Int32(SHUT_RDWR))
        Glibc.close(fd)
        if case let .unix(path) = address { unlink(path) }
    }
}
