import FoundationEssentials
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// An answer of the API as the client received it.
public struct APIClientResponse: Sendable {
    public var status: Int
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]

    public var text: String { String(decoding: body, as: UTF8.self) }

    /// The body decoded (snake_case keys).
    public func decode<T: Decodable>(_ type: T.Type) throws -> T {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return try decoder.decode(type, from: Data(body))
    }

    /// The `fault_message` of an error answer, or the body as text.
    public var faultMessage: String {
        (try? decode(APIFault.self).faultMessage) ?? (body.isEmpty ? "HTTP \(status)" : text)
    }
}

public enum APIClientError: Error, CustomStringConvertible {
    case socket(APISocketError)
    case io(operation: String, errno: Int32)
    case badResponse(String)
    case refused(path: String)

    public var description: String {
        switch self {
        case let .socket(e): return "\(e)"
        case let .io(op, err): return "API request: \(op) failed: \(String(cString: strerror(err)))"
        case let .badResponse(why): return "unexpected answer from the VM: \(why)"
        case let .refused(path): return "nothing listens at \(path) any more (a stale socket: its VM is gone)"
        }
    }
}

/// A small blocking HTTP/1.1 client over the API's Unix socket (what `swiftvisor ctl` and the
/// other CLI commands use; no event loop needed for one request).
public struct APIClient: Sendable {
    public let socketPath: String

    public init(socketPath: String) { self.socketPath = socketPath }

    /// Sends one request and returns the whole answer.
    public func send(_ method: String, _ path: String, json body: (some Encodable)? = Optional<String>.none) throws -> APIClientResponse {
        try exchange(method, path, body: body.map(APIJSON.encode), streaming: false) { _ in }
    }

    /// Sends one request and hands each line of the answer's body to `onLine` as it arrives
    /// (`PUT /migrate` answers with progress lines); returns the answer (its body holds the
    /// bytes after the last newline, if any).
    public func stream(_ method: String, _ path: String, json body: some Encodable, onLine: (String) -> Void) throws -> APIClientResponse {
        var pending: [UInt8] = []
        var response = try exchange(method, path, body: APIJSON.encode(body), streaming: true) { chunk in
            pending += chunk
            while let newline = pending.firstIndex(of: 10) {
                onLine(String(decoding: pending[..<newline], as: UTF8.self))
                pending.removeSubrange(...newline)
            }
        }
        response.body = pending
        return response
    }

    /// One request; the answer's body goes to `onChunk` piece by piece when `streaming`,
    /// else into the returned response.
    private func exchange(_ method: String, _ path: String, body: [UInt8]?, streaming: Bool,
                          onChunk: ([UInt8]) -> Void) throws -> APIClientResponse {
        let fd: Int32
        do { fd = try APISocketPath.connect(socketPath) } catch { throw APIClientError.socket(error) }
        guard fd >= 0 else { throw APIClientError.refused(path: socketPath) }
        defer { close(fd) }
        var request = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n"
        if let body { request += "Content-Type: application/json\r\nContent-Length: \(body.count)\r\n" }
        request += "\r\n"
        try writeAll(fd, Array(request.utf8) + (body ?? []))
        var reader = Reader(fd: fd)
        let statusLine = try reader.line()
        let parts = statusLine.split(separator: " ", maxSplits: 2)
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), let status = Int(parts[1]) else {
            throw APIClientError.badResponse("status line '\(statusLine)'")
        }
        var headers: [(String, String)] = []
        while true {
            let line = try reader.line()
            if line.isEmpty { break }
            guard let colon = line.firstIndex(of: ":") else { throw APIClientError.badResponse("header line '\(line)'") }
            headers.append((line[..<colon].lowercased(), String(line[line.index(after: colon)...]).trimmed))
        }
        func header(_ name: String) -> String? { headers.first { $0.0 == name }?.1 }
        var received: [UInt8] = []
        func deliver(_ chunk: [UInt8]) { if streaming { onChunk(chunk) } else { received += chunk } }
        if header("transfer-encoding")?.lowercased() == "chunked" {
            while true {
                let sizeLine = try reader.line()
                guard let size = Int(sizeLine.prefix { $0 != ";" }, radix: 16) else { throw APIClientError.badResponse("chunk size '\(sizeLine)'") }
                if size == 0 { break }
                deliver(try reader.bytes(size))
                _ = try reader.line()
            }
        } else if let length = header("content-length").flatMap(Int.init) {
            deliver(try reader.bytes(length))
        } else {
            deliver(try reader.rest())
        }
        return APIClientResponse(status: status, headers: headers, body: received)
    }

    private func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            // MSG_NOSIGNAL: a server that went away is an error here, not SIGPIPE.
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            if n < 0 { if errno == EINTR { continue }; throw APIClientError.io(operation: "send", errno: errno) }
            offset += n
        }
    }

    /// Buffered reads from the socket.
    private struct Reader {
        let fd: Int32
        var buffer: [UInt8] = []
        var eof = false

        init(fd: Int32) { self.fd = fd }

        mutating func fill() throws {
            var chunk = [UInt8](repeating: 0, count: 16384)
            while true {
                let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if n < 0 { if errno == EINTR { continue }; throw APIClientError.io(operation: "recv", errno: errno) }
                if n == 0 { eof = true } else { buffer += chunk[0..<n] }
                return
            }
        }

        mutating func line() throws -> String {
            while true {
                if let cr = buffer.firstIndex(of: 10) {
                    var end = cr
                    if end > 0 && buffer[end - 1] == 13 { end -= 1 }
                    let text = String(decoding: buffer[..<end], as: UTF8.self)
                    buffer.removeSubrange(...cr)
                    return text
                }
                if eof { throw APIClientError.badResponse("the connection closed mid-answer") }
                try fill()
            }
        }

        mutating func bytes(_ count: Int) throws -> [UInt8] {
            while buffer.count < count {
                if eof { throw APIClientError.badResponse("the connection closed mid-answer") }
                try fill()
            }
            defer { buffer.removeSubrange(..<count) }
            return Array(buffer[..<count])
        }

        mutating func rest() throws -> [UInt8] {
            while !eof { try fill() }
            defer { buffer = [] }
            return buffer
        }
    }
}
