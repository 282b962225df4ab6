import Dispatch
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Where the API listens.
public enum APIEndpoint: Sendable, Equatable, CustomStringConvertible {
    /// A Unix stream socket at this path (its permissions are the access control).
    case unix(path: String)
    /// Loopback TCP; every request must carry `Authorization: Bearer TOKEN`.
    case tcp(host: String, port: Int, token: String)

    public var description: String {
        switch self {
        case let .unix(path): return path
        case let .tcp(host, port, _): return "\(host):\(port)"
        }
    }
}

/// The HTTP/1.1 server of the operator API (SwiftNIO): one event loop thread accepts and
/// parses; each complete request is answered on a worker queue (snapshots and migrations
/// block), so an idle or slow client never holds up another. Connections that send nothing
/// for `readTimeout` are closed; each connection carries one request.
public final class APIServer: Sendable {
    public let endpoint: APIEndpoint
    private let group: MultiThreadedEventLoopGroup
    private let channel: any Channel
    private let closed = Atomic<Bool>(false)
    private let logger: Logger
    /// Requests being answered: close() lets them finish (a snapshot or migration the VM's
    /// end interrupts would otherwise lose its answer).
    private let inFlight = DispatchGroup()

    /// The largest request body accepted.
    static let maxBodyBytes = 1 << 20

    public init(endpoint: APIEndpoint, router: APIRouter, logger: Logger = .silent, readTimeoutSeconds: Double = 10) throws {
        let readTimeout = TimeAmount.nanoseconds(Int64(readTimeoutSeconds * 1e9))
        // A client that goes away before its answer is written must not end the process.
        signal(SIGPIPE, SIG_IGN)
        if case let .unix(path) = endpoint { try APISocketPath.prepare(path) }
        if case let .tcp(host, _, _) = endpoint, host != "127.0.0.1", host != "::1", host != "localhost" {
            throw APIError.badRequest("--api-tcp listens on loopback only (127.0.0.1 or ::1), not \(host)")
        }
        self.endpoint = endpoint
        self.logger = logger
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let work = DispatchQueue(label: "swiftvisor.api", attributes: .concurrent)
        let inFlight = self.inFlight
        let token: String?
        if case let .tcp(_, _, t) = endpoint { token = t } else { token = nil }
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 512)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: readTimeout))
                    try channel.pipeline.syncOperations.addHandler(APIHTTPHandler(router: router, work: work, inFlight: inFlight, token: token, logger: logger))
                }
            }
        do {
            switch endpoint {
            case let .unix(path): channel = try bootstrap.bind(unixDomainSocketPath: path).wait()
            case let .tcp(host, port, _): channel = try bootstrap.bind(host: host, port: port).wait()
            }
        } catch {
            try? group.syncShutdownGracefully()
            throw error
        }
        self.group = group
        // A stop signal or a fatal fault removes the socket file too.
        if case let .unix(path) = endpoint { ProcessLifecycle.register(path: path) }
        logger.info("API listening", metadata: ["endpoint": "\(endpoint)"])
    }

    /// The TCP port actually bound (for `--api-tcp 127.0.0.1:0`).
    public var boundPort: Int? { channel.localAddress?.port }

    deinit { close() }

    /// Stops accepting, lets the requests being answered finish (for at most a minute),
    /// closes the connections, and removes the socket file.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        try? channel.close().wait()
        if inFlight.wait(timeout: .now() + 60) == .timedOut { logger.warning("closing the API with requests still running") }
        try? group.syncShutdownGracefully()
        if case let .unix(path) = endpoint {
            unlink(path)
            ProcessLifecycle.unregister(path: path)
        }
    }
}

/// One connection: gathers a request, hands it to the router on the worker queue, writes
/// the answer and closes.
final class APIHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let router: APIRouter
    private let work: DispatchQueue
    private let inFlight: DispatchGroup
    private let token: String?
    private let logger: Logger
    private var head: HTTPRequestHead?
    private var body: [UInt8] = []
    private var tooLarge = false
    /// A request is being answered: an idle read is then expected, not a reason to close.
    private var answering = false

    init(router: APIRouter, work: DispatchQueue, inFlight: DispatchGroup, token: String?, logger: Logger) {
        self.router = router; self.work = work; self.inFlight = inFlight; self.token = token; self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case let .head(h):
            head = h
            body = []
            tooLarge = false
        case var .body(buffer):
            if body.count + buffer.readableBytes > APIServer.maxBodyBytes {
                tooLarge = true
            } else if let bytes = buffer.readBytes(length: buffer.readableBytes) {
                body += bytes
            }
        case .end:
            guard let h = head, !answering else { return }
            head = nil
            answering = true
            let channel = context.channel
            if tooLarge {
                Self.send(APIRouter.fault(.badRequest("the body exceeds \(APIServer.maxBodyBytes) bytes")), on: channel)
                return
            }
            if let token, h.headers["authorization"].first != "Bearer \(token)" {
                Self.send(.complete(status: 401, contentType: "application/json",
                                    body: APIJSON.encode(APIFault(faultMessage: "this endpoint needs 'Authorization: Bearer TOKEN' (the --api-token-file's)"))),
                          on: channel)
                return
            }
            let request = APIRequest(method: h.method.rawValue, path: h.uri, body: body)
            body = []
            let router = self.router, logger = self.logger, inFlight = self.inFlight
            inFlight.enter()
            work.async {
                logger.debug("request", metadata: ["method": "\(request.method)", "path": "\(request.path)"])
                Self.send(router.respond(to: request), on: channel) { inFlight.leave() }
            }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read, !answering {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("API connection error: \(error)")
        context.close(promise: nil)
    }

    /// Writes `response` from any thread, then closes the connection and calls `done`.
    static func send(_ response: APIResponse, on channel: any Channel, done: @escaping @Sendable () -> Void = {}) {
        var headers = HTTPHeaders()
        headers.add(name: "connection", value: "close")
        headers.add(name: "server", value: "swiftvisor")
        switch response {
        case let .complete(status, contentType, body, afterSending):
            if !body.isEmpty { headers.add(name: "content-type", value: contentType) }
            headers.add(name: "content-length", value: "\(body.count)")
            channel.write(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: status), headers: headers)), promise: nil)
            if !body.isEmpty { channel.write(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(bytes: body))), promise: nil) }
            channel.writeAndFlush(HTTPServerResponsePart.end(nil)).whenComplete { _ in
                channel.close(promise: nil)
                afterSending?()
                done()
            }
        case let .stream(contentType, produce):
            headers.add(name: "content-type", value: contentType)
            headers.add(name: "transfer-encoding", value: "chunked")
            channel.writeAndFlush(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)), promise: nil)
            produce { chunk in
                channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(bytes: chunk))), promise: nil)
            }
            channel.writeAndFlush(HTTPServerResponsePart.end(nil)).whenComplete { _ in
                channel.close(promise: nil)
                done()
            }
        }
    }
}
