import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Why a TAP interface could not be attached.
public enum TAPError: Error, Equatable, Sendable, CustomStringConvertible {
    case tunUnavailable(errno: Int32)
    case invalidInterfaceName(String)
    case permissionDenied(interface: String)
    case interfaceBusy(interface: String)
    case setupFailed(interface: String, step: String, errno: Int32)

    public var description: String {
        switch self {
        case let .tunUnavailable(err):
            return "cannot open /dev/net/tun: \(String(cString: strerror(err))); load the tun module (`modprobe tun`) or run where /dev/net/tun exists"
        case let .invalidInterfaceName(name):
            return "\"\(name)\" is not a valid interface name (1-15 characters, no '/' or whitespace)"
        case let .permissionDenied(name):
            return "not allowed to attach TAP interface \(name): it needs CAP_NET_ADMIN (run as root, or create it beforehand with `ip tuntap add dev \(name) mode tap user $USER`)"
        case let .interfaceBusy(name):
            return "TAP interface \(name) is already attached by another process, or exists with other flags"
        case let .setupFailed(name, step, err):
            return "TAP interface \(name): \(step) failed: \(String(cString: strerror(err)))"
        }
    }
}

/// A network backend on a Linux TAP interface (/dev/net/tun, IFF_TAP | IFF_NO_PI): frames
/// the guest sends are written to the interface; frames the host sends to the interface
/// are read by a background thread and handed to the device.
///
/// Sends never block: when the kernel's queue is full the frame is dropped and counted,
/// as a real NIC would. The reader thread stops when the backend is released.
public final class TAPBackend: NetworkBackend {
    /// From <linux/if_tun.h>, which Swift cannot import as macros.
    static let TUNSETIFF: UInt = 0x4004_54CA  // _IOW('T', 202, int)
    static let IFF_TAP: Int16 = 0x0002
    static let IFF_NO_PI: Int16 = 0x1000
    static let ifreqSize = 40
    static let interfaceNameSize = 16  // IFNAMSIZ, including the NUL

    /// Counters for tests and statistics.
    public struct Statistics: Equatable, Sendable {
        public var sentFrames: UInt64 = 0
        public var sendDropped: UInt64 = 0
        public var receivedFrames: UInt64 = 0
    }

    /// The interface name the kernel assigned (a pattern like "tap%d" is resolved).
    public let interfaceName: String
    private let reader: Reader
    private let thread: pthread_t

    /// Attaches to (or creates) TAP interface `interfaceName`.
    public init(interfaceName: String) throws(TAPError) {
        let nameBytes = Array(interfaceName.utf8)
        guard !nameBytes.isEmpty, nameBytes.count < Self.interfaceNameSize,
              !nameBytes.contains(where: { $0 == UInt8(ascii: "/") || $0 <= 0x20 }) else {
            throw .invalidInterfaceName(interfaceName)
        }
        let fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { throw .tunUnavailable(errno: errno) }

        // struct ifreq: ifr_name[16], then the union whose first member is ifr_flags.
        var request = [UInt8](repeating: 0, count: Self.ifreqSize)
        request.replaceSubrange(0..<nameBytes.count, with: nameBytes)
        withUnsafeBytes(of: (Self.IFF_TAP | Self.IFF_NO_PI).littleEndian) {
            request.replaceSubrange(16..<18, with: $0)
        }
        let result = request.withUnsafeMutableBytes { bytes -> Int32 in
            guard let pointer = bytes.baseAddress else { return -1 }
            return ioctl(fd, Self.TUNSETIFF, pointer)
        }
        guard result == 0 else {
            let err = errno
            close(fd)
            switch err {
            case EPERM, EACCES: throw .permissionDenied(interface: interfaceName)
            case EBUSY: throw .interfaceBusy(interface: interfaceName)
            default: throw .setupFailed(interface: interfaceName, step: "TUNSETIFF", errno: err)
            }
        }
        let assigned = request[0..<Self.interfaceNameSize].prefix { $0 != 0 }
        self.interfaceName = String(decoding: assigned, as: UTF8.self)

        // A pipe whose read end the reader polls beside the TAP: writing to it stops the
        // reader. (eventfd and pipe2 are not visible to Swift without _GNU_SOURCE.)
        var wake: [Int32] = [-1, -1]
        guard pipe(&wake) == 0 else {
            let err = errno
            close(fd)
            throw .setupFailed(interface: interfaceName, step: "pipe", errno: err)
        }
        for end in wake { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        let reader = Reader(fd: fd, wakeFD: wake[0], wakeWriteFD: wake[1])
        var thread = pthread_t()
        let context = Unmanaged.passRetained(reader).toOpaque()
        let created = pthread_create(&thread, nil, { context in
            // The thread owns one reference to the reader, taken here.
            guard let context else { return nil }
            Unmanaged<Reader>.fromOpaque(context).takeRetainedValue().run()
            return nil
        }, context)
        guard created == 0 else {
            Unmanaged<Reader>.fromOpaque(context).release()
            close(wake[0])
            close(wake[1])
            close(fd)
            throw .setupFailed(interface: interfaceName, step: "starting the reader thread", errno: created)
        }
        self.reader = reader
        self.thread = thread
    }

    deinit {
        // Wake the reader out of poll(2), wait for it, then close: closing first could let
        // the descriptor number be reused under the thread's feet.
        var one: UInt8 = 1
        _ = write(reader.wakeWriteFD, &one, 1)
        pthread_join(thread, nil)
        close(reader.fd)
        close(reader.wakeFD)
        close(reader.wakeWriteFD)
    }

    public var statistics: Statistics { reader.stats.withLock { $0 } }

    public func send(_ frame: [UInt8]) {
        let n = frame.withUnsafeBytes { write(reader.fd, $0.baseAddress, $0.count) }
        reader.stats.withLock {
            if n == frame.count { $0.sentFrames += 1 } else { $0.sendDropped += 1 }
        }
    }

    public func setReceiver(_ receiver: (any NetworkFrameReceiver)?) {
        reader.receiver.withLock { $0 = WeakReceiver(value: receiver) }
    }

    /// The state the reader thread shares with the backend.
    final class Reader: Sendable {
        let fd: Int32
        let wakeFD: Int32
        let wakeWriteFD: Int32
        let receiver = Mutex(WeakReceiver())
        let stats = Mutex(Statistics())

        init(fd: Int32, wakeFD: Int32, wakeWriteFD: Int32) {
            self.fd = fd
            self.wakeFD = wakeFD
            self.wakeWriteFD = wakeWriteFD
        }

        func run() {
            // A TAP read returns one whole frame; 64 KiB covers any frame without GSO.
            var buffer = [UInt8](repeating: 0, count: 65536 + 64)
            var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)]
            while true {
                let ready = poll(&fds, 2, -1)
                if ready < 0 {
                    if errno == EINTR { continue }
                    return
                }
                if fds[1].revents != 0 { return }
                if fds[0].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 { return }
                guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
                // Drain everything queued, then poll again.
                while true {
                    let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                    if n < 0 {
                        if errno == EINTR { continue }
                        break  // EAGAIN: drained (or an error poll will report)
                    }
                    if n == 0 { break }
                    stats.withLock { $0.receivedFrames += 1 }
                    let target = receiver.withLock { $0.value }
                    target?.receiveFrame(Array(buffer[0..<n]))
                }
            }
        }
    }
}
