import Foundation
import TestSupport
import Testing

/// What a new user trips over: usage errors, help text, messages.
@Suite struct CLIUsabilityTests {
    /// Every bad --memory is a usage error (64) that names the value; a negative number is
    /// reported as invalid, not as a missing value.
    @Test(arguments: ["-5", "-64M", "3M", "0", "1K", "4G", "99999999999999999999G", "12X", ""])
    func badMemoryIsAUsageError(value: String) throws {
        let r = try swiftvisor(["run", "hello", "--memory", value])
        #expect(r.status == 64, "--memory '\(value)': \(r.stderr)")
        #expect(!r.stderr.contains("Missing value"))
        #expect(r.stderr.contains("'\(value)' is invalid for '--memory <size>'") || r.stderr.contains("--memory \(value.uppercased())") || r.stderr.contains("guest RAM must be"),
                "\(r.stderr)")
    }

    @Test func goodMemoryStillRuns() throws {
        let r = try swiftvisor(["run", "hello", "--memory", "128M", "--engine", "software"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("128 MiB RAM"))
    }

    @Test func helpShowsTheMemoryDefaultAsASize() throws {
        for args in [["run", "--help"], ["lab", "balloon", "--help"]] {
            let r = try swiftvisor(args)
            #expect(!r.stdout.contains("MemoryArgument"), "\(args)")
        }
        #expect(try swiftvisor(["run", "--help"]).stdout.contains("(default: 64M)"))
    }

    /// Help paragraphs are not pre-wrapped: on a wide terminal a sentence stays on one line,
    /// so no line break of the source shows up as an orphan line.
    @Test func helpParagraphsAreNotPreWrapped() throws {
        let commands = [["run"], ["snapshot"], ["lab"], ["lab", "dedup"], ["lab", "pio-vs-mmio"], ["migrate"], ["bench", "startup"]]
        for command in commands {
            let help = try BackgroundSwiftvisor(command + ["--help"], environment: ["COLUMNS": "1000"])
            #expect(help.waitForExit())
            #expect(help.exitStatus == 0)
            // With 1000 columns, a paragraph of prose is one line; the only line breaks left
            // are between paragraphs, before list items and in aligned tables.
            let lines = help.stdout.split(separator: "\n", omittingEmptySubsequences: false)
            for (previous, line) in zip(lines, lines.dropFirst()) where !previous.isEmpty && !line.isEmpty {
                let prose = !line.hasPrefix(" ") && !line.contains("  ") && !previous.contains("  ") && !previous.hasSuffix(":")
                    && !line.hasPrefix("USAGE") && !line.hasPrefix("OPTIONS") && !line.hasPrefix("ARGUMENTS") && !line.hasPrefix("SUBCOMMANDS")
                    && !previous.hasPrefix("OVERVIEW")
                #expect(!prose, "\(command): '\(previous)' is followed by '\(line)' — a pre-wrapped paragraph")
            }
        }
        let run = try BackgroundSwiftvisor(["run", "--help"], environment: ["COLUMNS": "1000"])
        #expect(run.waitForExit())
        #expect(run.stdout.contains("optionally followed by its own command line in the same argument"))
    }

    /// Piped (not a terminal), a long lab prints no progress line, only its result.
    @Test func labProgressOnlyOnATerminal() throws {
        let dir = NSTemporaryDirectory() + "swiftvisor-cli-dedup-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try swiftvisor(["lab", "dedup", "--engine", "software", "--pages", "32", "--output", dir])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(!r.stderr.contains("\r") && !r.stderr.contains("\u{1B}["))
        #expect(!r.stderr.contains("left"))
    }

    /// The disk guest's deliberate read past the end reads as expected behaviour, not as a failure.
    @Test func readPastTheEndOfADiskIsNotAFailure() throws {
        let image = NSTemporaryDirectory() + "swiftvisor-cli-end-\(getpid()).img"
        defer { unlink(image) }
        #expect(FileManager.default.createFile(atPath: image, contents: Data(count: 64 * 1024)))
        let r = try swiftvisor(["run", "disk", "--disk", image, "--engine", "software"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("disk: reading past the end is refused, as it should be (status 1)"))
        #expect(!r.stderr.contains("beyond capacity"))
        #expect(r.stderr.contains("past the end of the disk (128 sectors); the guest gets an I/O error, as from a real disk"))
    }

    /// net-ping without a peer says what it waits for (and --timeout then ends it).
    @Test func netPingWithoutAPeerSaysItIsWaiting() throws {
        let r = try swiftvisor(["run", "net-ping count=1", "--net", "switch:alone", "--engine", "software", "--timeout", "15"])
        #expect(r.status == 124)
        #expect(r.stdout.contains("net: no answer yet; waiting for a peer (a VM running 'net-ping pong=1' on the same switch)\n"))
    }
}
