// The live-migration wire format (version 2; integers little-endian).
//
// Each side first sends a 16-byte preamble: magic "SVMIGRAT", u32 format version, u32
// reserved (0). Then frames, each
//
//     u32 kind   u32 payload length (≤ maxPayload)   u32 CRC-32C of kind, length and payload
//     payload
//
// Source → destination: offer (JSON `MigrationOffer`), then page frames and round ends while
// the guest runs, then — the guest paused — the last page frame(s), vcpus (the snapshot
// format's `SnapshotVCPUCodec`), devices (`SnapshotDeviceCodec`, the same records a snapshot
// file holds) and complete (u64 pages sent in all). Destination → source: accept or reject
// (JSON) after the offer, then confirm once the machine is built and about to run, or
// failure (JSON) when it gives up; during pre-copy it answers each round end with the
// stream bytes it has consumed (round acknowledged). Either side closes the connection on any error; the
// source resumes its guest unless it has read confirm.
//
// A page frame is u32 count, then per page u64 descriptor (page number; bit 63: the page is
// all zeros and no data follows) and, unless zero, its 4096 bytes.

import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import VirtCore

public enum MigrationFormat {
    /// "SVMIGRAT".
    public static let magic: [UInt8] = Array("SVMIGRAT".utf8)
    /// The version this build speaks; a peer with another one is refused with a clear error.
    public static let version: UInt32 = 2
    public static let preambleSize = 16
    static let frameHeaderSize = 12
    /// The largest payload a reader accepts (a hostile length is refused before allocating).
    public static let maxPayload = 4 << 20
    /// Pages per page frame.
    static let pagesPerFrame = 256
    static let zeroPageFlag: UInt64 = 1 << 63
    static let pageSize = 4096

    static func preamble(version: UInt32 = version) -> [UInt8] {
        var w = SnapshotByteWriter()
        w.raw(magic); w.u32(version); w.u32(0)
        return w.bytes
    }
}

/// Frame kinds.
public enum MigrationFrameKind: UInt32, Sendable, CustomStringConvertible {
    case offer = 1, accept = 2, reject = 3, pages = 4, roundEnd = 5, vcpus = 6, devices = 7, complete = 8
    case confirm = 9, failure = 10
    /// Post-copy: the state is sent, pages follow on demand (u64 page count).
    case postcopyStart = 11
    /// Post-copy, destination → source: u64 page the guest faulted on.
    case pageRequest = 12
    /// Post-copy, destination → source: every page is in (JSON `PostcopyStatistics`).
    case postcopyDone = 13
    /// Pre-copy, destination → source, for each round end: u64 bytes of the stream it has
    /// consumed so far. The source measures the bandwidth from these, not from what the
    /// socket buffers took (on loopback they take megabytes at memory speed).
    case roundAcknowledged = 14
    /// Post-copy recovery, destination → source after accepting a resuming offer: u64 page
    /// count, then the bitmap of the pages it holds.
    case resumeState = 15

    public var description: String {
        switch self {
        case .offer: return "offer"
        case .accept: return "accept"
        case .reject: return "reject"
        case .pages: return "pages"
        case .roundEnd: return "round end"
        case .vcpus: return "vcpus"
        case .devices: return "devices"
        case .complete: return "complete"
        case .confirm: return "confirm"
        case .failure: return "failure"
        case .postcopyStart: return "post-copy start"
        case .pageRequest: return "page request"
        case .postcopyDone: return "post-copy done"
        case .roundAcknowledged: return "round acknowledged"
        case .resumeState: return "resume state"
        }
    }
}

/// What the source proposes: the machine it will send.
public struct MigrationOffer: Codable, Sendable, Equatable {
    public var sourceEngine: String
    public var memorySize: UInt64
    public var vcpuCount: Int
    public var commandLine: String
    public var guestName: String
    /// Device records the source will send (their names; the recipes travel in the
    /// "devices" record as in a snapshot).
    public var deviceCount: Int
    /// State first, pages on demand (else pre-copy).
    public var postcopy: Bool
    /// Reconnects a post-copy migration that broke after the switch-over (nil: a new one).
    public var resume: Bool? = nil
}

/// The destination's answer to an offer.
public struct MigrationAnswer: Codable, Sendable, Equatable {
    public var accepted: Bool
    public var engine: String
    public var reason: MigrationRejection?
    public var message: String
}

/// Why a destination refused an offer.
public enum MigrationRejection: String, Codable, Sendable, Equatable {
    /// The destination may not hold this much guest RAM.
    case memoryTooSmall = "memory-too-small"
    /// Another migration is arriving, or a machine already runs there.
    case busy
    /// The offer's vCPU count or guest does not fit the destination.
    case incompatible
}

/// A typed migration failure; each says in one line what went wrong and which side knows more.
public enum MigrationError: Error, Equatable, Sendable, CustomStringConvertible {
    case badAddress(String)
    case socketFailed(operation: String, address: String, errno: Int32)
    /// The peer closed the connection (or it was cut) while `expecting` was awaited.
    case connectionClosed(expecting: String)
    case timedOut(expecting: String)
    /// The peer does not start with the migration magic.
    case notAMigrationStream
    case unsupportedVersion(found: UInt32, supported: UInt32)
    /// A frame failed its checksum, had an unknown kind, a length over the limit, or a
    /// payload that does not decode.
    case corruptFrame(String)
    /// A frame came that the protocol does not allow at this point.
    case unexpectedFrame(got: String, expecting: String)
    case rejected(MigrationRejection, message: String)
    /// The peer gave up and said why.
    case peerFailed(String)
    /// The source machine cannot be migrated (devices, capability).
    case notMigratable(String)
    /// The destination could not rebuild the machine from what it received.
    case restoreFailed(String)
    case alreadyMigrating
    /// The destination stopped listening (closed) while waiting for a source.
    case listenerClosed
    /// Post-copy broke after the switch-over: the guest runs at the destination but lacks
    /// pages only the source holds (it keeps them; its machine stays stopped).
    case postcopyInterrupted(pagesDelivered: Int, pageCount: Int, cause: String)

    public var description: String {
        switch self {
        case let .badAddress(text):
            return "migration address '\(text)' is not tcp:HOST:PORT or unix:PATH"
        case let .socketFailed(op, address, err):
            return "\(op) \(address) failed: \(String(cString: strerror(err)))"
        case let .connectionClosed(expecting):
            return "the connection closed while waiting for \(expecting)"
        case let .timedOut(expecting):
            return "timed out waiting for \(expecting)"
        case .notAMigrationStream:
            return "the peer is not a swiftvisor migration endpoint (no \"SVMIGRAT\" preamble)"
        case let .unsupportedVersion(found, supported):
            return "the peer speaks migration format version \(found); this build speaks version \(supported)"
        case let .corruptFrame(why):
            return "corrupt migration stream: \(why)"
        case let .unexpectedFrame(got, expecting):
            return "migration protocol error: got a \(got) frame, expected \(expecting)"
        case let .rejected(reason, message):
            return "the destination refused the migration (\(reason.rawValue)): \(message)"
        case let .peerFailed(message):
            return "the peer aborted the migration: \(message)"
        case let .notMigratable(why):
            return "this machine cannot be migrated: \(why)"
        case let .restoreFailed(why):
            return "the destination could not rebuild the machine: \(why)"
        case .alreadyMigrating:
            return "a migration of this machine is already in progress"
        case .listenerClosed:
            return "the destination stopped listening"
        case let .postcopyInterrupted(delivered, count, cause):
            return "post-copy interrupted after the switch-over (\(cause)): \(delivered) of \(count) pages sent; the destination's guest waits for the rest, which the source keeps for a resume"
        }
    }
}

/// One decoded frame.
/// A received frame. Its payload shares the channel's receive buffer: reading it costs no
/// copy, and keeping it past the next receive costs one (copy-on-write).
struct MigrationFrame {
    var kind: MigrationFrameKind
    var payload: ArraySlice<UInt8>
}

/// Frames over a connection: buffered writes, exact reads, CRC-32C on every frame.
final class MigrationChannel {
    let connection: MigrationConnection
    private var out: [UInt8] = []
    /// Frames are received into this buffer, allocated once (a fresh megabyte per frame
    /// would be mapped, faulted in and unmapped by the allocator each time).
    private var inbox = [UInt8](repeating: 0, count: MigrationFormat.frameHeaderSize + MigrationFormat.maxPayload)
    /// Bytes written to the connection so far (after flushes).
    private(set) var bytesSent: UInt64 = 0
    private(set) var bytesReceived: UInt64 = 0

    init(connection: MigrationConnection) {
        self.connection = connection
        out.reserveCapacity(MigrationFormat.maxPayload + 64)
    }

    // MARK: Writing

    func sendPreamble() throws(MigrationError) {
        try connection.send(MigrationFormat.preamble())
        bytesSent += UInt64(MigrationFormat.preambleSize)
    }

    /// Appends a frame to the output buffer; `flush()` sends it.
    func queue(_ kind: MigrationFrameKind, _ payload: [UInt8]) throws(MigrationError) {
        try queue(kind) { $0.append(contentsOf: payload) }
    }

    /// Appends a frame whose payload `fill` appends to the buffer in place.
    func queue(_ kind: MigrationFrameKind, fill: (inout [UInt8]) -> Void) throws(MigrationError) {
        if out.count > MigrationFormat.maxPayload { try flush() }
        let start = out.count
        out.append(contentsOf: repeatElement(0, count: MigrationFormat.frameHeaderSize))
        fill(&out)
        let length = out.count - start - MigrationFormat.frameHeaderSize
        precondition(length <= MigrationFormat.maxPayload, "frame payload over the limit")
        out.withUnsafeMutableBytes { raw in
            let h = raw.baseAddress! + start
            h.storeBytes(of: kind.rawValue.littleEndian, toByteOffset: 0, as: UInt32.self)
            h.storeBytes(of: UInt32(length).littleEndian, toByteOffset: 4, as: UInt32.self)
            var crc = SnapshotCRC32C.update(0, UnsafeRawPointer(h), 8)
            crc = SnapshotCRC32C.update(crc, UnsafeRawPointer(h + MigrationFormat.frameHeaderSize), length)
            h.storeBytes(of: crc.littleEndian, toByteOffset: 8, as: UInt32.self)
        }
    }

    func send(_ kind: MigrationFrameKind, _ payload: [UInt8]) throws(MigrationError) {
        try queue(kind, payload)
        try flush()
    }

    func sendJSON<T: Encodable>(_ kind: MigrationFrameKind, _ value: T) throws(MigrationError) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        guard let data = try? encoder.encode(value) else { throw .corruptFrame("cannot encode \(kind)") }
        try send(kind, Array(data))
    }

    func flush() throws(MigrationError) {
        guard !out.isEmpty else { return }
        try connection.send(out)
        bytesSent += UInt64(out.count)
        out.removeAll(keepingCapacity: true)
    }

    // MARK: Reading

    /// Reads and checks the peer's preamble: magic first, then the version.
    func receivePreamble() throws(MigrationError) {
        let bytes = try connection.receive(MigrationFormat.preambleSize, expecting: "the migration preamble")
        bytesReceived += UInt64(bytes.count)
        guard Array(bytes[0..<8]) == MigrationFormat.magic else { throw .notAMigrationStream }
        var r = SnapshotByteReader(Array(bytes[8...]), section: "preamble")
        let version = (try? r.u32()) ?? 0
        guard version == MigrationFormat.version else {
            throw .unsupportedVersion(found: version, supported: MigrationFormat.version)
        }
        guard (try? r.u32()) == 0 else { throw .corruptFrame("preamble reserved field is not zero") }
    }

    /// The next frame, checksum verified. A failure frame from the peer is thrown as `peerFailed`.
    func receive(expecting: String) throws(MigrationError) -> MigrationFrame {
        var failure: MigrationError?
        var kindValue: UInt32 = 0, length = 0
        inbox.withUnsafeMutableBytes { raw in
            let base = raw.baseAddress!
            do throws(MigrationError) {
                try connection.receive(into: base, count: MigrationFormat.frameHeaderSize, expecting: expecting)
                kindValue = UInt32(littleEndian: base.loadUnaligned(as: UInt32.self))
                let declared = UInt32(littleEndian: base.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
                let stored = UInt32(littleEndian: base.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
                guard Int(declared) <= MigrationFormat.maxPayload else {
                    throw .corruptFrame("frame length \(declared) is over the \(MigrationFormat.maxPayload)-byte limit")
                }
                length = Int(declared)
                let payload = base + MigrationFormat.frameHeaderSize
                try connection.receive(into: payload, count: length, expecting: expecting)
                let crc = SnapshotCRC32C.update(SnapshotCRC32C.update(0, base, 8), payload, length)
                guard crc == stored else { throw .corruptFrame("frame checksum mismatch while waiting for \(expecting)") }
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
        bytesReceived += UInt64(MigrationFormat.frameHeaderSize + length)
        let payload = inbox[MigrationFormat.frameHeaderSize..<MigrationFormat.frameHeaderSize + length]
        guard let kind = MigrationFrameKind(rawValue: kindValue) else { throw .corruptFrame("unknown frame kind \(kindValue)") }
        if kind == .failure {
            let message = (try? JSONDecoder().decode(MigrationFailureMessage.self, from: Data(payload)))?.message
            throw .peerFailed(message ?? String(decoding: payload, as: UTF8.self))
        }
        return MigrationFrame(kind: kind, payload: payload)
    }

    /// The next frame, which must be of `kind`.
    func receive(_ kind: MigrationFrameKind) throws(MigrationError) -> [UInt8] {
        let frame = try receive(expecting: "the \(kind) frame")
        guard frame.kind == kind else { throw .unexpectedFrame(got: frame.kind.description, expecting: kind.description) }
        return Array(frame.payload)
    }

    func receiveJSON<T: Decodable>(_ kind: MigrationFrameKind, as type: T.Type) throws(MigrationError) -> T {
        let payload = try receive(kind)
        guard let value = try? JSONDecoder().decode(type, from: Data(payload)) else {
            throw .corruptFrame("\(kind) frame does not decode")
        }
        return value
    }

    /// Tells the peer why this side gives up; best effort (the connection may be gone).
    func sendFailure(_ message: String) {
        out.removeAll(keepingCapacity: true)
        try? sendJSON(.failure, MigrationFailureMessage(message: message))
    }
}

struct MigrationFailureMessage: Codable {
    var message: String
}

/// Page frames: encoding from guest RAM, decoding into guest RAM.
enum MigrationPageCodec {
    /// Whether the 4 KiB page at `p` is all zeros.
    @inline(__always)
    static func isZero(_ p: UnsafeRawPointer) -> Bool {
        let words = p.assumingMemoryBound(to: UInt64.self)
        var any: UInt64 = 0
        var i = 0
        while i < 512 {
            any |= words[i] | words[i + 1] | words[i + 2] | words[i + 3] | words[i + 4] | words[i + 5] | words[i + 6] | words[i + 7]
            if any != 0 { return false }
            i += 8
        }
        return true
    }

    /// Pages of `memory` backed by storage; the others are holes of its memfd (never
    /// written, or discarded) and read as zeros, so they are sent without being read —
    /// reading them would allocate them.
    static func allocatedPages(of memory: GuestMemory) -> DirtyBitmap {
        let pageCount = Int(memory.size) / MigrationFormat.pageSize
        var pages = DirtyBitmap(pageCount: pageCount)
        let seekData: Int32 = 3, seekHole: Int32 = 4  // SEEK_DATA, SEEK_HOLE (Linux)
        var offset: off_t = 0
        while offset < off_t(memory.size) {
            let start = lseek(memory.fileDescriptor, offset, seekData)
            guard start >= 0 else {
                // ENXIO: no data after `offset`; any other error: treat the rest as data.
                if errno != ENXIO { for p in Int(offset) / MigrationFormat.pageSize..<pageCount { pages[p] = true } }
                break
            }
            var end = lseek(memory.fileDescriptor, start, seekHole)
            if end < 0 { end = off_t(memory.size) }
            for p in Int(start) / MigrationFormat.pageSize..<min(pageCount, (Int(end) + MigrationFormat.pageSize - 1) / MigrationFormat.pageSize) {
                pages[p] = true
            }
            offset = end
        }
        return pages
    }

    /// Appends a page frame's payload for `pages` (at most `pagesPerFrame`) of `memory`;
    /// returns how many were zero pages. Pages outside `allocated` (when given) are zero
    /// without being read.
    static func encode<Pages: Collection<Int>>(pages: Pages, of memory: GuestMemory, allocated: DirtyBitmap?, into out: inout [UInt8]) -> Int {
        var zeros = 0
        var count = UInt32(pages.count).littleEndian
        withUnsafeBytes(of: &count) { out.append(contentsOf: $0) }
        for page in pages {
            let source = memory.base + page * MigrationFormat.pageSize
            let zero = allocated.map { !$0[page] } == true || isZero(source)
            var descriptor = (UInt64(page) | (zero ? MigrationFormat.zeroPageFlag : 0)).littleEndian
            withUnsafeBytes(of: &descriptor) { out.append(contentsOf: $0) }
            if zero { zeros += 1; continue }
            out.append(contentsOf: UnsafeRawBufferPointer(start: source, count: MigrationFormat.pageSize))
        }
        return zeros
    }

    /// Calls `body(page, data)` for each page of a frame (`data` nil for a zero page) after
    /// checking the whole frame: any page outside `pageCount` or a payload of the wrong
    /// length is `corruptFrame` and nothing is delivered. Returns the pages it held.
    static func forEachPage(_ payload: ArraySlice<UInt8>, pageCount: Int,
                            _ body: (Int, UnsafeRawPointer?) throws(MigrationError) -> Void) throws(MigrationError) -> Int {
        var result: Result<Int, MigrationError> = .success(0)
        payload.withUnsafeBytes { raw in
            result = Result { () throws(MigrationError) -> Int in
                guard raw.count >= 4, let base = raw.baseAddress else { throw .corruptFrame("page frame count") }
                let count = Int(UInt32(littleEndian: base.loadUnaligned(as: UInt32.self)))
                guard count <= (raw.count - 4) / 8 else { throw .corruptFrame("page frame count") }
                // Pass 1: every descriptor in range and the length exact, before any page is delivered.
                var offset = 4
                for _ in 0..<count {
                    guard offset + 8 <= raw.count else { throw .corruptFrame("page frame descriptor") }
                    let descriptor = UInt64(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
                    let page = descriptor & ~MigrationFormat.zeroPageFlag
                    guard page < UInt64(pageCount) else {
                        throw .corruptFrame("page \(page) is outside the destination's \(pageCount) pages")
                    }
                    offset += 8
                    if descriptor & MigrationFormat.zeroPageFlag == 0 {
                        guard raw.count - offset >= MigrationFormat.pageSize else { throw .corruptFrame("page frame data is short") }
                        offset += MigrationFormat.pageSize
                    }
                }
                guard offset == raw.count else { throw .corruptFrame("page frame has trailing bytes") }
                // Pass 2: deliver.
                offset = 4
                for _ in 0..<count {
                    let descriptor = UInt64(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
                    offset += 8
                    let page = Int(descriptor & ~MigrationFormat.zeroPageFlag)
                    if descriptor & MigrationFormat.zeroPageFlag != 0 {
                        try body(page, nil)
                    } else {
                        try body(page, base + offset)
                        offset += MigrationFormat.pageSize
                    }
                }
                return count
            }
        }
        return try result.get()
    }

    /// Writes a page frame's pages into `memory`; returns the pages it held. `written`
    /// marks the pages that hold data: a zero page that never did is left alone (fresh RAM
    /// reads as zeros, and touching it would allocate it). Into fresh RAM, runs of
    /// consecutive pages go into the RAM's memfd with one pwritev each: the kernel allocates
    /// the pages without zeroing them first, and no page fault is taken per page as a copy
    /// through the mapping would. Into preallocated RAM (`preallocated`), whose pages and
    /// page-table entries exist, a plain copy through the mapping is cheaper still.
    static func decode(_ payload: ArraySlice<UInt8>, into memory: GuestMemory, written: inout DirtyBitmap,
                       preallocated: Bool = false) throws(MigrationError) -> Int {
        var pending = PageRunWriter(fd: memory.fileDescriptor)
        defer { pending.deallocate() }
        let count = try forEachPage(payload, pageCount: Int(memory.size) / MigrationFormat.pageSize) { (page, data) throws(MigrationError) in
            if let data {
                if preallocated {
                    (memory.base + page * MigrationFormat.pageSize).copyMemory(from: data, byteCount: MigrationFormat.pageSize)
                } else {
                    try pending.add(page: page, data: data)
                }
                written[page] = true
            } else if written[page] {
                try pending.flush()
                memset(memory.base + page * MigrationFormat.pageSize, 0, MigrationFormat.pageSize)
                written[page] = false
            }
        }
        try pending.flush()
        return count
    }
}

/// Consecutive pages gathered for one pwritev into a memfd.
struct PageRunWriter {
    static let capacity = 64
    let fd: Int32
    private let vectors = UnsafeMutablePointer<iovec>.allocate(capacity: capacity)
    private var count = 0
    private var firstPage = 0

    init(fd: Int32) { self.fd = fd }

    func deallocate() { vectors.deallocate() }

    mutating func add(page: Int, data: UnsafeRawPointer) throws(MigrationError) {
        if count == Self.capacity || (count > 0 && page != firstPage + count) { try flush() }
        if count == 0 { firstPage = page }
        vectors[count] = iovec(iov_base: UnsafeMutableRawPointer(mutating: data), iov_len: MigrationFormat.pageSize)
        count += 1
    }

    mutating func flush() throws(MigrationError) {
        guard count > 0 else { return }
        var offset = off_t(firstPage * MigrationFormat.pageSize)
        var left = count * MigrationFormat.pageSize
        var first = 0
        while left > 0 {
            let n = pwritev(fd, vectors + first, Int32(count - first), offset)
            if n < 0 {
                if errno == EINTR { continue }
                throw .restoreFailed("writing received pages into guest RAM failed (errno \(errno))")
            }
            left -= n
            offset += off_t(n)
            // Skip the vectors written whole; trim a partly written one.
            var done = n
            while done > 0 {
                let len = vectors[first].iov_len
                if done >= len { done -= len; first += 1 } else {
                    vectors[first].iov_base += done
                    vectors[first].iov_len -= done
                    done = 0
                }
            }
        }
        count = 0
    }
}
