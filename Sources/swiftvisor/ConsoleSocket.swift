import VMM
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// `run --console-dir DIR`: VM N's serial console (COM1) also served on the Unix stream
/// socket DIR/vmN.sock, so each VM of a run can be driven on its own — standard input
/// reaches vm0 only. A connected client reads the VM's output from then on and its bytes
/// are typed into the VM's UART; one client at a time (the next waits until it leaves).
/// Output while no client is connected, or that a client does not read fast enough, is
/// dropped, as on a serial line: the VM never waits for a client.
// SAFETY: `client` and `closing` are used only under `lock`; `thread` only by the thread that
// owns the socket (start, close); `listener` and `path` are immutable.
final class ConsoleSocket: @unchecked Sendable {
    let path: String
    private let listener: Int32
    private let lock = HostLock()
    private var client: Int32 = -1
    private var closing = false
    private var thread: HostThread?

    /// The socket's path for VM `index` under `directory`.
    static func path(directory: String, index: Int) -> String { "\(directory)/vm\(index).sock" }

    /// Listens at `path` (a stale socket there is replaced; anything else is an error).
    init(path: String) throws(ConsoleSocketError) {
        self.path = path
        guard var address = sockaddr_un.forPath(path) else { throw .pathTooLong(path) }
        var info = stat()
        if lstat(path, &info) == 0 {
            guard info.st_mode & S_IFMT == S_IFSOCK else { throw .notASocket(path) }
            unlink(path)
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .failed(path: path, operation: "socket", errno: errno) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(fd, 4) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw .failed(path: path, operation: "listen", errno: e)
        }
        listener = fd
    }

    /// Starts accepting clients; what they send goes to `input`.
    func start(feeding input: @escaping @Sendable ([UInt8]) -> Void) {
        thread = HostThread(name: "console") { [self] in serve(input) }
    }

    /// One byte of the VM's output to the client, if one is connected and keeps up.
    func write(_ byte: UInt8) {
        lock.withLock {
            guard client >= 0 else { return }
            var b = byte
            while send(client, &b, 1, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) < 0 && errno == EINTR {}
        }
    }

    /// Stops accepting, disconnects the client and removes the socket file.
    func close() {
        lock.withLock {
            closing = true
            if client >= 0 { Glibc.shutdown(client, Int32(SHUT_RDWR)) }
        }
        Glibc.shutdown(listener, Int32(SHUT_RDWR))
        thread?.join()
        Glibc.close(listener)
        unlink(path)
    }

    private func serve(_ input: @Sendable ([UInt8]) -> Void) {
        var buffer = [UInt8](repeating: 0, count: 256)
        while true {
            let fd = accept(listener, nil, nil)
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return  // the listener was shut down
            }
            let serving = lock.withLock { () -> Bool in
                if !closing { client = fd }
                return !closing
            }
            guard serving else { Glibc.close(fd); return }
            while true {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                input(Array(buffer[0..<n]))
            }
            lock.withLock { client = -1 }
            Glibc.close(fd)
        }
    }
}

enum ConsoleSocketError: Error, CustomStringConvertible {
    case pathTooLong(String)
    case notASocket(String)
    case failed(path: String, operation: String, errno: Int32)

    var description: String {
        switch self {
        case let .pathTooLong(path): return "console socket path is too long (at most 107 bytes): \(path)"
        case let .notASocket(path): return "\(path) exists and is not a socket; refusing to replace it"
        case let .failed(path, operation, code): return "console socket \(path): \(operation) failed: \(String(cString: strerror(code)))"
        }
    }
}

extension ConsoleSocket {
    /// `output`, and the socket's client too when there is a socket.
    static func tee(_ output: @escaping @Sendable (UInt8) -> Void, _ socket: ConsoleSocket?) -> @Sendable (UInt8) -> Void {
        guard let socket else { return output }
        return { byte in
            output(byte)
            socket.write(byte)
        }
    }
}
