import FoundationEssentials
import VMM

/// A failed request, as its status code and `fault_message`.
public enum APIError: Error, Equatable, CustomStringConvertible {
    case badRequest(String)
    case notFound(String)
    case methodNotAllowed(String)
    case conflict(String)
    case internalError(String)

    public var status: Int {
        switch self {
        case .badRequest: return 400
        case .notFound: return 404
        case .methodNotAllowed: return 405
        case .conflict: return 409
        case .internalError: return 500
        }
    }

    public var description: String {
        switch self {
        case let .badRequest(m), let .notFound(m), let .methodNotAllowed(m), let .conflict(m), let .internalError(m): return m
        }
    }
}

/// One request as the server hands it over: method, path (without the query), body.
public struct APIRequest: Sendable {
    public var method: String
    public var path: String
    public var body: [UInt8]
    public init(method: String, path: String, body: [UInt8] = []) {
        self.method = method
        self.path = String(path.prefix { $0 != "?" })
        self.body = body
    }
}

/// What a request is answered with: a whole body, or lines produced while the work runs.
public enum APIResponse: Sendable {
    /// `afterSending` runs once the answer has been written (Stop stops the VM then).
    case complete(status: Int, contentType: String, body: [UInt8], afterSending: (@Sendable () -> Void)? = nil)
    /// A chunked answer: `produce` hands each chunk to its argument, in order.
    case stream(contentType: String, produce: @Sendable (_ emit: @escaping @Sendable ([UInt8]) -> Void) -> Void)
}

/// JSON as the API speaks it: snake_case keys, sorted.
enum APIJSON {
    static func encode(_ value: some Encodable) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(value) else { return Array(#"{"fault_message":"the answer could not be encoded"}"#.utf8) }
        return Array(data)
    }

    static func decode<T: Decodable>(_ type: T.Type, _ body: [UInt8]) throws(APIError) -> T {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        do {
            return try decoder.decode(type, from: Data(body))
        } catch let DecodingError.keyNotFound(key, _) {
            throw .badRequest("the body lacks \"\(key.stringValue.snakeCased)\"")
        } catch let DecodingError.typeMismatch(_, context) {
            throw .badRequest("wrong type for \"\(context.codingPath.map { $0.stringValue.snakeCased }.joined(separator: "."))\"")
        } catch {
            throw .badRequest(body.isEmpty ? "this request needs a JSON body" : "the body is not valid JSON for this request")
        }
    }
}

extension String {
    /// camelCase → snake_case, for naming a key in an error.
    var snakeCased: String {
        var out = ""
        for c in self {
            if c.isUppercase { out += "_" + c.lowercased() } else { out.append(c) }
        }
        return out
    }
}

/// Maps requests to the controller's resources. The route table is also what the OpenAPI
/// test compares with docs/api/swiftvisor.yaml.
public struct APIRouter: Sendable {
    /// Every served path pattern (`{x}` matches one segment) and its methods.
    public static let routes: [(path: String, methods: [String])] = [
        ("/", ["GET"]),
        ("/vm", ["PATCH"]),
        ("/actions", ["PUT"]),
        ("/machine-config", ["GET", "PUT"]),
        ("/boot-source", ["PUT"]),
        ("/drives/{drive_id}", ["PUT"]),
        ("/network-interfaces/{iface_id}", ["PUT"]),
        ("/balloon", ["GET", "PUT", "PATCH"]),
        ("/balloon/statistics", ["GET"]),
        ("/snapshot/create", ["PUT"]),
        ("/snapshot/load", ["PUT"]),
        ("/migrate", ["PUT"]),
        ("/metrics", ["GET"]),
    ]

    let controller: VMController

    public init(controller: VMController) { self.controller = controller }

    /// Answers `request`; may block (snapshots), so call it off the event loop.
    public func respond(to request: APIRequest) -> APIResponse {
        do {
            return try route(request)
        } catch {
            controller.logger.info("request refused", metadata: ["method": "\(request.method)", "path": "\(request.path)",
                                                                 "status": "\(error.status)", "fault": "\(error.description)"])
            return Self.fault(error)
        }
    }

    static func fault(_ error: APIError) -> APIResponse {
        .complete(status: error.status, contentType: "application/json", body: APIJSON.encode(APIFault(faultMessage: error.description)))
    }

    static func json(_ value: some Encodable, status: Int = 200) -> APIResponse {
        .complete(status: status, contentType: "application/json", body: APIJSON.encode(value))
    }

    static var noContent: APIResponse { .complete(status: 204, contentType: "application/json", body: []) }

    /// The pattern `path` matches and the values of its `{…}` segments.
    static func match(_ path: String) -> (pattern: String, methods: [String], parameters: [String])? {
        let segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst().map(String.init)
        let normalized = segments.last == "" && segments.count > 1 ? Array(segments.dropLast()) : segments
        for route in routes {
            let pattern = route.path.split(separator: "/", omittingEmptySubsequences: false).dropFirst().map(String.init)
            guard pattern.count == normalized.count else { continue }
            var parameters: [String] = []
            var matches = true
            for (p, s) in zip(pattern, normalized) {
                if p.hasPrefix("{") {
                    if s.isEmpty { matches = false; break }
                    parameters.append(s)
                } else if p != s {
                    matches = false; break
                }
            }
            if matches { return (route.path, route.methods, parameters) }
        }
        return nil
    }

    private func route(_ r: APIRequest) throws(APIError) -> APIResponse {
        guard r.path.hasPrefix("/"), let (pattern, methods, parameters) = Self.match(r.path) else {
            throw .notFound("no resource at \(r.path) (see docs/api/swiftvisor.yaml)")
        }
        guard methods.contains(r.method) else {
            throw .methodNotAllowed("\(r.path) takes \(methods.joined(separator: ", ")), not \(r.method)")
        }
        let c = controller
        switch (pattern, r.method) {
        case ("/", "GET"):
            return Self.json(c.info)
        case ("/vm", "PATCH"):
            try c.setVMState(try APIJSON.decode(VMStateRequest.self, r.body))
            return Self.noContent
        case ("/actions", "PUT"):
            let action = try APIJSON.decode(ActionRequest.self, r.body)
            try c.perform(action)
            if action.actionType == "Stop" {
                return .complete(status: 204, contentType: "application/json", body: [], afterSending: { c.stop() })
            }
            return Self.noContent
        case ("/machine-config", "GET"):
            let i = c.info
            return Self.json(MachineConfigRequest(vcpuCount: i.vcpus, memSizeMib: i.memoryBytes >> 20, engine: i.engine))
        case ("/machine-config", "PUT"):
            try c.setMachineConfig(try APIJSON.decode(MachineConfigRequest.self, r.body))
            return Self.noContent
        case ("/boot-source", "PUT"):
            try c.setBootSource(try APIJSON.decode(BootSourceRequest.self, r.body))
            return Self.noContent
        case ("/drives/{drive_id}", "PUT"):
            try c.setDrive(id: parameters[0], try APIJSON.decode(DriveRequest.self, r.body))
            return Self.noContent
        case ("/network-interfaces/{iface_id}", "PUT"):
            try c.setNetworkInterface(id: parameters[0], try APIJSON.decode(NetworkInterfaceRequest.self, r.body))
            return Self.noContent
        case ("/balloon", "GET"):
            return Self.json(try c.balloonInfo())
        case ("/balloon", "PUT"):
            try c.configureBalloon(try APIJSON.decode(BalloonRequest.self, r.body))
            return Self.noContent
        case ("/balloon", "PATCH"):
            return Self.json(try c.setBalloonTarget(try APIJSON.decode(BalloonRequest.self, r.body)))
        case ("/balloon/statistics", "GET"):
            return Self.json(try c.balloonStatistics())
        case ("/snapshot/create", "PUT"):
            return Self.json(try c.snapshot(try APIJSON.decode(SnapshotCreateRequest.self, r.body)))
        case ("/snapshot/load", "PUT"):
            try c.setSnapshotToLoad(try APIJSON.decode(SnapshotLoadRequest.self, r.body))
            return Self.noContent
        case ("/migrate", "PUT"):
            let request = try APIJSON.decode(MigrateRequest.self, r.body)
            do { _ = try request.parsed() } catch { throw .badRequest("\(error)") }
            return .stream(contentType: "application/x-ndjson") { emit in
                c.migrate(request) { line in emit(APIJSON.encodeLine(line)) }
            }
        case ("/metrics", "GET"):
            return .complete(status: 200, contentType: "text/plain; version=0.0.4",
                             body: Array(MetricsExporter.text(machine: c.machine, controller: c).utf8))
        default:
            throw .internalError("route \(r.method) \(pattern) has no handler")
        }
    }
}

extension APIJSON {
    /// One JSON object and a newline: a line of a streamed answer.
    static func encodeLine(_ value: some Encodable) -> [UInt8] { encode(value) + [10] }
}
