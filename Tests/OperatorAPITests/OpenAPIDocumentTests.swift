import Foundation
import OperatorAPI
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// docs/api/swiftvisor.yaml against what the server serves, both ways.
@Suite struct OpenAPIDocumentTests {
    /// Path → methods, from the document's `paths:` section (paths indented by two spaces,
    /// methods by four: how the document is written).
    static func documented() throws -> [String: Set<String>] {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("docs/api/swiftvisor.yaml")
        let text = try String(contentsOf: url, encoding: .utf8)
        var paths: [String: Set<String>] = [:]
        var inPaths = false
        var current: String?
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
            if !line.hasPrefix(" ") && !line.isEmpty { inPaths = line == "paths:"; current = nil; continue }
            guard inPaths else { continue }
            if line.hasPrefix("  /"), !line.hasPrefix("   "), line.hasSuffix(":") {
                current = String(line.dropFirst(2).dropLast())
                paths[current!] = []
            } else if let c = current, line.hasPrefix("    "), !line.hasPrefix("     "), line.hasSuffix(":") {
                let method = String(line.dropFirst(4).dropLast())
                if ["get", "put", "patch", "post", "delete", "head", "options"].contains(method) { paths[c]!.insert(method.uppercased()) }
            }
        }
        return paths
    }

    @Test func everyServedPathAndMethodIsDocumentedAndNoOther() throws {
        let documented = try Self.documented()
        #expect(documented.count >= 13)
        let served = Dictionary(uniqueKeysWithValues: APIRouter.routes.map { ($0.path, Set($0.methods)) })
        #expect(documented == served)
    }

    /// Every documented path and method reaches a handler on a live server (never 404 or
    /// 405), and a method the document does not list is refused with 405.
    @Test func everyDocumentedPathAndMethodIsServed() throws {
        let controller = VMController(serialOutput: { _ in })
        let path = socketPath("openapi")
        let server = try APIServer(endpoint: .unix(path: path), router: APIRouter(controller: controller))
        defer { server.close() }
        let client = APIClient(socketPath: path)
        for (pattern, methods) in try Self.documented() {
            let concrete = pattern.replacingOccurrences(of: "{drive_id}", with: "rootfs").replacingOccurrences(of: "{iface_id}", with: "eth0")
            for method in methods {
                // Without a body the write requests stop at their 400: nothing is changed.
                let status = try client.send(method, concrete).status
                #expect(![404, 405].contains(status), "\(method) \(concrete) answered \(status)")
            }
            let undocumented = ["GET", "PUT", "PATCH", "DELETE"].first { !methods.contains($0) }
            if let undocumented { #expect(try client.send(undocumented, concrete).status == 405, "\(undocumented) \(concrete)") }
        }
    }
}
