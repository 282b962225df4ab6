import TestSupport
import Testing
import VirtCore
@testable import VMM

/// Seeded fuzzing of the ELF loader: valid images with header and program-header fields
/// overwritten by boundary values, bits flipped, bytes randomised or the file cut short.
/// Parsing gives a typed error or an image whose segments lie in the file; loading gives a
/// typed error and writes nothing, or writes exactly the segments and nothing else.
@Suite struct ELFLoaderFuzzTests {
    static let ramSize: UInt64 = 2 << 20
    static let canary: UInt8 = 0xA5
    /// Offset and width of every ELF header field the loader reads.
    static let headerFields: [(offset: Int, width: Int)] = [(4, 1), (5, 1), (16, 2), (18, 2), (24, 8), (32, 8), (54, 2), (56, 2)]
    /// Offset and width of every program-header field the loader reads.
    static let segmentFields: [(offset: Int, width: Int)] = [(0, 4), (4, 4), (8, 8), (24, 8), (32, 8), (40, 8)]

    /// A valid image of one to three segments placed in [imageBase, ramSize).
    static func validImage(_ g: inout SplitMix64) -> [UInt8] {
        let base = BootLayout.imageBase
        var b = ELFBuilder(code: (0..<1 + Int(g.next() % 64)).map { _ in UInt8(truncatingIfNeeded: g.next()) },
                           at: base + (g.next() % 0x1000))
        for _ in 0..<Int(g.next() % 3) {
            let length = Int(g.next() % 256)
            let paddr = base + g.next() % (ramSize - base - 0x4000)
            b.segments.append(.init(paddr: paddr, bytes: (0..<length).map { _ in UInt8(truncatingIfNeeded: g.next()) },
                                    memsz: UInt64(length) + g.next() % 0x2000))
        }
        return b.build()
    }

    /// Overwrites one field the loader reads with a boundary (or random) value.
    static func overwriteField(_ bytes: inout [UInt8], _ g: inout SplitMix64) {
        let phnum = bytes.count >= 58 ? Int(bytes[56]) | Int(bytes[57]) << 8 : 0
        let field: (offset: Int, width: Int)
        if phnum > 0 && g.next() % 2 == 0 {
            let f = segmentFields[Int(g.next() % UInt64(segmentFields.count))]
            field = (64 + 56 * Int(g.next() % UInt64(phnum)) + f.offset, f.width)
        } else {
            field = headerFields[Int(g.next() % UInt64(headerFields.count))]
        }
        let value = Mutation.boundaryValue(&g)
        for i in 0..<field.width where field.offset + i < bytes.count {
            bytes[field.offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))
        }
    }

    @Test func damagedImagesGiveTypedErrorsOrLoadExactlyTheirSegments() throws {
        let memory = try GuestMemory(size: Self.ramSize)
        let untouched = [UInt8](repeating: Self.canary, count: Int(Self.ramSize))
        let seed = FuzzBudget.seed(0xE1F)
        var g = SplitMix64(seed: seed)
        var parsed = 0, loaded = 0, rejected = 0
        for iteration in 0..<FuzzBudget.iterations(standard: 600) {
            var bytes = Self.validImage(&g)
            for _ in 0..<1 + Int(g.next() % 3) {
                if g.next() % 2 == 0 { Self.overwriteField(&bytes, &g) } else { Mutation.random(&g).apply(to: &bytes, &g) }
            }
            let context = "seed \(seed) iteration \(iteration)"

            let image: ELFImage
            do {
                image = try ELFImage(bytes: bytes)
            } catch {
                rejected += 1
                continue  // typed: ELFImage(bytes:) throws only ELFLoadError
            }
            parsed += 1
            #expect(image.segments.contains { image.entry >= $0.physicalAddress && image.entry - $0.physicalAddress < $0.memorySize },
                    "entry outside every segment, \(context)")
            for s in image.segments {
                #expect(s.fileOffset >= 0 && s.fileOffset + s.fileSize <= bytes.count, "segment outside the file, \(context)")
                #expect(s.memorySize > 0 && UInt64(s.fileSize) <= s.memorySize, "segment sizes, \(context)")
            }

            try memory.fill(Self.canary, at: 0, count: Int(Self.ramSize))
            var expected = untouched
            do {
                try image.load(into: memory)
                loaded += 1
                for s in image.segments {
                    let start = Int(s.physicalAddress)
                    expected.replaceSubrange(start..<start + s.fileSize, with: bytes[s.fileOffset..<s.fileOffset + s.fileSize])
                    expected.replaceSubrange(start + s.fileSize..<start + Int(s.memorySize),
                                             with: repeatElement(0, count: Int(s.memorySize) - s.fileSize))
                }
            } catch {
                #expect(error is ELFLoadError, "untyped \(error), \(context)")
            }
            // RAM holds exactly the segments (or, after an error, nothing at all).
            #expect(sameBytes(try memory.read(at: 0, count: Int(Self.ramSize)), expected), "RAM differs from the segments, \(context)")
        }
        #expect(parsed > 0 && loaded > 0 && rejected > 0, "parsed \(parsed), loaded \(loaded), rejected \(rejected)")
    }
}
