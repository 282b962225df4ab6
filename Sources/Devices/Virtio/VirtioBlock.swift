import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// Why a disk image could not be opened. Each message says what to do about it.
public enum VirtioBlockError: Error, Equatable, Sendable, CustomStringConvertible {
    case fileNotFound(path: String)
    case permissionDenied(path: String, readOnly: Bool)
    case readOnlyFileSystem(path: String)
    case notARegularFile(path: String)
    case sizeNotSectorMultiple(path: String, size: UInt64)
    case emptyImage(path: String)
    case inUse(path: String)
    case openFailed(path: String, errno: Int32)
    case syncFailed(path: String, errno: Int32)

    public var description: String {
        switch self {
        case let .fileNotFound(path):
            return "disk image \(path) does not exist; create one (e.g. `truncate -s 64M \(path)`) or check the path"
        case let .permissionDenied(path, readOnly):
            return readOnly
                ? "no permission to read disk image \(path); fix its permissions (chmod/chown)"
                : "no permission to open disk image \(path) for writing; fix its permissions or attach it read-only"
        case let .readOnlyFileSystem(path):
            return "disk image \(path) is on a read-only file system; attach it read-only or copy it elsewhere"
        case let .notARegularFile(path):
            return "\(path) is not a regular file; a disk image must be a plain file (raw format)"
        case let .sizeNotSectorMultiple(path, size):
            return "disk image \(path) is \(size) bytes, not a multiple of 512; pad it with `truncate -s %512 \(path)`"
        case let .emptyImage(path):
            return "disk image \(path) is empty; give it a size (e.g. `truncate -s 64M \(path)`)"
        case let .inUse(path):
            return "disk image \(path) is in use by another VM or process (it holds a lock on it); stop that user or attach a copy"
        case let .openFailed(path, err):
            return "cannot open disk image \(path): \(String(cString: strerror(err)))"
        case let .syncFailed(path, err):
            return "cannot make the writes to disk image \(path) durable (fdatasync): \(String(cString: strerror(err)))"
        }
    }
}

/// Counters a VMM can show for a block device.
public struct VirtioBlockStatistics: Equatable, Sendable {
    public var reads: UInt64 = 0
    public var writes: UInt64 = 0
    public var flushes: UInt64 = 0
    public var bytesRead: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    /// Requests completed with VIRTIO_BLK_S_IOERR or _UNSUPP.
    public var failedRequests: UInt64 = 0
}

/// virtio-blk (device ID 2) over a raw disk-image file, one request queue.
///
/// Offers VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE (512), VIRTIO_BLK_F_FLUSH and, for
/// a read-only image, VIRTIO_BLK_F_RO. Handles IN, OUT, FLUSH and GET_ID; other request
/// types complete with UNSUPP. Data moves between the file and guest RAM directly with
/// pread/pwrite. Requests run synchronously on the notifying vCPU thread.
///
/// The image is locked (flock: shared when read-only, exclusive otherwise) so two VMs
/// cannot write one image at once.
public final class VirtioBlock: VirtioDevice {
    public static let sectorSize = 512
    public static let featureSegMax: UInt64 = 1 << 2
    public static let featureReadOnly: UInt64 = 1 << 5
    public static let featureBlockSize: UInt64 = 1 << 6
    public static let featureFlush: UInt64 = 1 << 9
    /// Bytes of the GET_ID answer.
    public static let serialLength = 20

    enum RequestType: UInt32 {
        case read = 0      // VIRTIO_BLK_T_IN
        case write = 1     // VIRTIO_BLK_T_OUT
        case flush = 4
        case getID = 8
    }

    enum Status: UInt8 {
        case ok = 0
        case ioError = 1
        case unsupported = 2
    }

    /// The request header: type, reserved, sector (spec 5.2.6).
    static let headerSize = 16

    public let name: String
    public var deviceID: VirtioDeviceID { .block }
    public let offeredFeatures: UInt64
    public let queueMaxSizes: [UInt16]
    public let path: String
    public let readOnly: Bool
    /// Size in 512-byte sectors, from the file size at open.
    public let capacity: UInt64
    /// The 20-byte GET_ID answer (zero-padded).
    public let serial: [UInt8]

    private let fd: Int32
    private let stats = Mutex(VirtioBlockStatistics())

    /// Opens `path` as a raw disk image.
    /// - Parameter serial: GET_ID answer (up to 20 bytes); default: the file's name.
    public init(path: String, readOnly: Bool = false, serial: String? = nil, queueSize: UInt16 = 256,
                name: String = "virtio-blk") throws(VirtioBlockError) {
        let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else {
            let err = errno
            switch err {
            case ENOENT, ENOTDIR: throw .fileNotFound(path: path)
            case EACCES, EPERM: throw .permissionDenied(path: path, readOnly: readOnly)
            case EROFS: throw .readOnlyFileSystem(path: path)
            case EISDIR: throw .notARegularFile(path: path)
            default: throw .openFailed(path: path, errno: err)
            }
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let err = errno
            close(fd)
            throw .openFailed(path: path, errno: err)
        }
        guard st.st_mode & S_IFMT == S_IFREG else {
            close(fd)
            throw .notARegularFile(path: path)
        }
        let size = UInt64(st.st_size)
        guard size > 0 else {
            close(fd)
            throw .emptyImage(path: path)
        }
        guard size % UInt64(Self.sectorSize) == 0 else {
            close(fd)
            throw .sizeNotSectorMultiple(path: path, size: size)
        }
        guard flock(fd, (readOnly ? LOCK_SH : LOCK_EX) | LOCK_NB) == 0 else {
            let err = errno
            close(fd)
            if err == EWOULDBLOCK { throw .inUse(path: path) }
            throw .openFailed(path: path, errno: err)
        }
        self.fd = fd
        self.path = path
        self.readOnly = readOnly
        self.capacity = size / UInt64(Self.sectorSize)
        self.name = name
        self.queueMaxSizes = [queueSize]
        let id = Array((serial ?? String(path.split(separator: "/").last ?? "")).utf8.suffix(Self.serialLength))
        self.serial = id + [UInt8](repeating: 0, count: Self.serialLength - id.count)
        self.offeredFeatures = Self.featureSegMax | Self.featureBlockSize | Self.featureFlush
            | (readOnly ? Self.featureReadOnly : 0)
    }

    deinit { close(fd) }

    /// Makes every write so far durable (fdatasync), as the VMM does when a run ends.
    public func flush() throws(VirtioBlockError) {
        guard !readOnly else { return }
        while fdatasync(fd) != 0 {
            let err = errno
            if err == EINTR { continue }
            throw .syncFailed(path: path, errno: err)
        }
    }

    public var statistics: VirtioBlockStatistics { stats.withLock { $0 } }

    // MARK: VirtioDevice

    public func configSpace() -> [UInt8] {
        var c = ConfigWriter()
        c.put(capacity)                                        // capacity
        c.put(UInt32(0))                                       // size_max (not offered)
        c.put(UInt32(max(1, Int(queueMaxSizes[0]) - 2)))       // seg_max: room for header + status
        c.put(UInt16(0)); c.put(UInt8(0)); c.put(UInt8(0))     // geometry (not offered)
        c.put(UInt32(Self.sectorSize))                         // blk_size
        c.put(UInt8(0)); c.put(UInt8(0)); c.put(UInt16(0)); c.put(UInt32(0))  // topology
        c.put(UInt8(0)); c.put(UInt8(0))                       // writeback, unused
        c.put(UInt16(1))                                       // num_queues
        return c.bytes
    }

    public func reset() {}

    public func process(queue index: Int, _ queue: inout VirtioQueue, memory: GuestMemory,
                        diagnostics: VirtioDiagnostics) throws(VirtqueueError) {
        // A chain whose buffers are unusable still gets IOERR in its status byte when its
        // last descriptor is a writable buffer in RAM.
        let failRequest: (GuestBuffer?) -> UInt32 = { last in
            self.stats.withLock { $0.failedRequests += 1 }
            guard let last, (try? memory.store(Status.ioError.rawValue, at: last.address + UInt64(last.length - 1))) != nil
            else { return 0 }
            return 1
        }
        while let chain = try queue.nextChain(from: memory, diagnostics: diagnostics, failRequest: failRequest) {
            let used = handle(chain, memory, diagnostics)
            try queue.addUsed(head: chain.head, length: used, in: memory)
        }
    }

    /// Carries out one request; returns the used length.
    private func handle(_ chain: DescriptorChain, _ memory: GuestMemory, _ diagnostics: VirtioDiagnostics) -> UInt32 {
        // The status byte is the last device-writable byte. Without one the driver cannot
        // learn the outcome, so do nothing and return the chain.
        guard chain.writableLength >= 1 else {
            fault(diagnostics, "blockNoStatus", "request \(chain.head) has no device-writable status byte")
            stats.withLock { $0.failedRequests += 1 }
            return 0
        }
        let statusOffset = chain.writableLength - 1
        var written = 0  // data bytes put into device-writable buffers
        let status: Status
        do {
            guard chain.readableLength >= Self.headerSize else {
                throw RequestFailure(kind: "blockShortHeader",
                                     message: "request \(chain.head) has \(chain.readableLength) readable bytes, less than the 16-byte header")
            }
            let header = try chain.readableBytes(in: memory, count: Self.headerSize)
            let rawType = Self.le(UInt32.self, header, 0)
            let sector = Self.le(UInt64.self, header, 8)
            switch RequestType(rawValue: rawType) {
            case .read:
                let count = statusOffset
                let ranges = try dataRange(sector: sector, bytes: count, chain.head)
                try transfer(GuestBuffer.segments(of: chain.writable, offset: 0, count: count), at: ranges, memory, toGuest: true)
                written = count
                stats.withLock { $0.reads += 1; $0.bytesRead += UInt64(count) }
            case .write:
                guard !readOnly else {
                    throw RequestFailure(kind: "blockWriteReadOnly", message: "write request \(chain.head) to read-only image")
                }
                let count = chain.readableLength - Self.headerSize
                let ranges = try dataRange(sector: sector, bytes: count, chain.head)
                try transfer(GuestBuffer.segments(of: chain.readable, offset: Self.headerSize, count: count), at: ranges, memory, toGuest: false)
                stats.withLock { $0.writes += 1; $0.bytesWritten += UInt64(count) }
            case .flush:
                // Nothing can be dirty in a read-only image.
                if !readOnly {
                    while fdatasync(fd) != 0 {
                        let err = errno
                        if err == EINTR { continue }
                        throw RequestFailure(kind: "blockHostIO", message: "fdatasync of \(path): \(String(cString: strerror(err)))")
                    }
                }
                stats.withLock { $0.flushes += 1 }
            case .getID:
                written = try chain.writeWritable(Array(serial.prefix(statusOffset)), in: memory)
            case nil:
                throw RequestFailure(kind: "blockUnsupportedRequest", message: "request type \(rawType) is not supported",
                                     status: .unsupported)
            }
            status = .ok
        } catch let failure as RequestFailure {
            fault(diagnostics, failure.kind, failure.message)
            stats.withLock { $0.failedRequests += 1 }
            status = failure.status
            written = 0
        } catch {
            fault(diagnostics, "guestMemory", "\(error)")
            stats.withLock { $0.failedRequests += 1 }
            status = .ioError
            written = 0
        }
        _ = try? chain.writeWritable([status.rawValue], at: statusOffset, in: memory)
        return UInt32(written + 1)
    }

    private struct RequestFailure: Error {
        var kind: String
        var message: String
        var status: Status = .ioError
    }

    private func fault(_ diagnostics: VirtioDiagnostics, _ kind: String, _ message: String) {
        diagnostics.record(VirtioDeviceError(kind: kind, message: message))
    }

    /// Validates a transfer of `bytes` starting at `sector`; returns its file offset.
    private func dataRange(sector: UInt64, bytes: Int, _ head: UInt16) throws(RequestFailure) -> UInt64 {
        guard bytes % Self.sectorSize == 0 else {
            throw RequestFailure(kind: "blockUnalignedLength", message: "request \(head): \(bytes) data bytes is not a multiple of 512")
        }
        let sectors = UInt64(bytes / Self.sectorSize)
        guard sector <= capacity, sectors <= capacity - sector else {
            throw RequestFailure(kind: "blockOutOfRange",
                                 message: "request \(head): sectors \(sector)+\(sectors) lie past the end of the disk (\(capacity) sectors); the guest gets an I/O error, as from a real disk")
        }
        return sector * UInt64(Self.sectorSize)
    }

    /// Moves bytes between the image at `offset` and the guest `segments`, directly.
    private func transfer(_ segments: [GuestBuffer], at offset: UInt64, _ memory: GuestMemory, toGuest: Bool) throws(RequestFailure) {
        var position = offset
        for segment in segments {
            guard let pointer = memory.hostPointer(segment.address, length: segment.length) else {
                throw RequestFailure(kind: "guestMemory", message: "buffer \(segment) left guest RAM")
            }
            var done = 0
            while done < segment.length {
                let n = toGuest
                    ? pread(fd, pointer + done, segment.length - done, off_t(position) + off_t(done))
                    : pwrite(fd, pointer + done, segment.length - done, off_t(position) + off_t(done))
                if n < 0, errno == EINTR { continue }
                guard n > 0 else {
                    // n == 0 on a read: the file shrank under us since it was opened.
                    let what = n < 0 ? String(cString: strerror(errno)) : "unexpected end of file"
                    throw RequestFailure(kind: "blockHostIO",
                                         message: "\(toGuest ? "pread" : "pwrite") of \(path) at \(position + UInt64(done)): \(what)")
                }
                done += n
            }
            if toGuest { memory.noteHostWrite(segment.address, length: segment.length) }
            position += UInt64(segment.length)
        }
    }

    private static func le<T: FixedWidthInteger>(_: T.Type, _ bytes: [UInt8], _ at: Int) -> T {
        var v: T = 0
        for i in 0..<MemoryLayout<T>.size { v |= T(bytes[at + i]) << (8 * i) }
        return v
    }
}
