// The live-migration wire format (version 1; integers little-endian).
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
// failure (JSON) when it gives up. Either side closes the connection on any error; the
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
    public static let version: UInt32 = 1
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
            return "post-copy interrupted after the switch-over (\(cause)): \(delivered) of \(count) pages reached the destination, whose guest stops; the source keeps all pages"
        }
    }
}

/// One decoded frame.
struct MigrationFrame {
    var kind: MigrationFrameKind
    var payload: [UInt8]
}

/// Frames over a connection: buffered writes, exact reads, CRC-32C on every frame.
final class MigrationChannel {
    let connection: MigrationConnection
    private var out: [UInt8] = []
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
        let header = try connection.receive(MigrationFormat.frameHeaderSize, expecting: expecting)
        let kindValue = le32(header, 0), length = le32(header, 4), stored = le32(header, 8)
        guard Int(length) <= MigrationFormat.maxPayload else {
            throw .corruptFrame("frame length \(length) is over the \(MigrationFormat.maxPayload)-byte limit")
        }
        let payload = try connection.receive(Int(length), expecting: expecting)
        bytesReceived += UInt64(MigrationFormat.frameHeaderSize) + UInt64(length)
        var crc = header.withUnsafeBytes { SnapshotCRC32C.update(0, $0.baseAddress!, 8) }
        crc = payload.withUnsafeBytes { SnapshotCRC32C.update(crc, $0.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, $0.count) }
        guard crc == stored else { throw .corruptFrame("frame checksum mismatch while waiting for \(expecting)") }
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
        return frame.payload
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

    private func le32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
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
    static func encode(pages: ArraySlice<Int>, of memory: GuestMemory, allocated: DirtyBitmap?, into out: inout [UInt8]) -> Int {
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
    static func forEachPage(_ payload: [UInt8], pageCount: Int,
                            _ body: (Int, UnsafeRawPointer?) throws(MigrationError) -> Void) throws(MigrationError) -> Int {
        var r = SnapshotByteReader(payload, section: "pages")
        guard let count = try? r.count(UInt32.self, minimumBytesEach: 8) else { throw .corruptFrame("page frame count") }
        var entries: [(page: Int, offset: Int?)] = []
        entries.reserveCapacity(count)
        for _ in 0..<count {
            guard let descriptor = try? r.u64() else { throw .corruptFrame("page frame descriptor") }
            let page = descriptor & ~MigrationFormat.zeroPageFlag
            guard page < UInt64(pageCount) else {
                throw .corruptFrame("page \(page) is outside the destination's \(pageCount) pages")
            }
            if descriptor & MigrationFormat.zeroPageFlag != 0 {
                entries.append((Int(page), nil))
                continue
            }
            guard r.remaining >= MigrationFormat.pageSize else { throw .corruptFrame("page frame data is short") }
            entries.append((Int(page), r.offset))
            r.skip(MigrationFormat.pageSize)
        }
        guard r.remaining == 0 else { throw .corruptFrame("page frame has trailing bytes") }
        var failure: MigrationError?
        payload.withUnsafeBytes { raw in
            for e in entries {
                do throws(MigrationError) { try body(e.page, e.offset.map { UnsafeRawPointer(raw.baseAddress! + $0) }) } catch {
                    failure = error
                    return
                }
            }
        }
        if let failure { throw failure }
        return count
    }

    /// Writes a page frame's pages into `memory`; returns the pages it held. `written`
    /// marks the pages that hold data: a zero page that never did is left alone (fresh RAM
    /// reads as zeros, and touching it would allocate it).
    static func decode(_ payload: [UInt8], into memory: GuestMemory, written: inout DirtyBitmap) throws(MigrationError) -> Int {
        try forEachPage(payload, pageCount: Int(memory.size) / MigrationFormat.pageSize) { (page, data) throws(MigrationError) in
            let target = memory.base + page * MigrationFormat.pageSize
            if let data {
                target.copyMemory(from: data, byteCount: MigrationFormat.pageSize)
                written[page] = true
            } else if written[page] {
                memset(target, 0, MigrationFormat.pageSize)
                written[page] = false
            }
        }
    }
}
