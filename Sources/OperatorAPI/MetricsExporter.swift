import Devices
import Prometheus
import VirtCore
import VMM

/// The machine's counters in the Prometheus text format. The counters live where they are
/// kept anyway (the run loops' exit statistics, the queues' traffic, the engine's execution
/// counts, the balloon, the controller's snapshot and migration totals); a scrape reads
/// them into a fresh swift-prometheus registry, so nothing is counted twice and the VM pays
/// nothing between scrapes.
public enum MetricsExporter {
    public static func text(machine: Machine?, controller: VMController? = nil) -> String {
        let counters = controller?.counters ?? OperatorCounters()
        let registry = PrometheusCollectorRegistry()
        func descriptor(_ name: String, _ help: String) -> MetricNameDescriptor {
            let split = name.lastIndex(of: "_")!  // every name here has a unit suffix
            return MetricNameDescriptor(metricName: String(name[..<split]), unitName: String(name[name.index(after: split)...]), helpText: help)
        }
        func counter(_ name: String, _ help: String, _ value: UInt64, _ labels: [(String, String)] = []) {
            registry.makeCounter(descriptor: descriptor(name, help), labels: labels).increment(by: Int64(clamping: value))
        }
        func seconds(_ name: String, _ help: String, _ value: Double, _ labels: [(String, String)] = []) {
            registry.makeCounter(descriptor: descriptor(name, help), labels: labels).increment(by: value)
        }
        func gauge(_ name: String, _ help: String, _ value: Double, _ labels: [(String, String)] = []) {
            registry.makeGauge(descriptor: descriptor(name, help), labels: labels).set(to: value)
        }

        gauge("swiftvisor_vm_up", "1 while a VM exists in this process.", machine == nil ? 0 : 1)
        counter("swiftvisor_snapshots_total", "Snapshots taken through the API.", counters.snapshots)
        seconds("swiftvisor_snapshot_pause_seconds_total", "Time the guest was paused for snapshots.", counters.snapshotPauseSeconds)
        seconds("swiftvisor_snapshot_seconds_total", "Time from pause to the snapshot file in place.", counters.snapshotTotalSeconds)
        counter("swiftvisor_snapshot_cow_faults_total", "Guest writes to write-protected pages during snapshots.", counters.copyOnWriteFaults)
        counter("swiftvisor_migrations_total", "Completed live migrations.", counters.migrations)
        counter("swiftvisor_migration_dirty_pages_fetched_total", "Dirty pages found in the dirty log, over all rounds.",
                counters.migrationDirtyPagesFetched)
        counter("swiftvisor_migration_pages_sent_total", "Pages sent by completed migrations.", counters.migrationPagesSent)
        guard let machine else { return registry.emitToString() }

        gauge("swiftvisor_vm_paused", "1 while the VM is paused.", machine.isPaused ? 1 : 0)
        gauge("swiftvisor_vm_vcpus", "vCPUs of the VM.", Double(machine.configuration.vcpuCount))
        gauge("swiftvisor_guest_memory_bytes", "Guest RAM size.", Double(machine.memory.size))
        gauge("swiftvisor_guest_memory_host_bytes", "Guest RAM the host holds now.", Double(machine.memory.allocatedBytes))

        let exits = machine.liveExits.merged
        let report = exits.report
        for (reason, c) in report.reasons.sorted(by: { $0.key < $1.key }) {
            counter("swiftvisor_vm_exits_total", "VM exits by reason.", c.count, [("reason", reason)])
            seconds("swiftvisor_vm_exit_handling_seconds_total", "VMM time handling exits, by reason.", Double(c.nanoseconds) / 1e9,
                    [("reason", reason)])
        }
        for (port, c) in report.ports.sorted(by: { $0.key < $1.key }) {
            counter("swiftvisor_vm_port_exits_total", "Port-I/O exits by port.", c.count,
                    [("port", port), ("device", machine.bus.deviceName(port: UInt16(port.dropFirst(2), radix: 16) ?? 0) ?? "")])
        }
        seconds("swiftvisor_vcpu_guest_seconds_total", "vCPU time spent running guest code.", Double(exits.guestNanoseconds) / 1e9)
        seconds("swiftvisor_vcpu_vmm_seconds_total", "vCPU time spent in the VMM handling exits.",
                Double(report.reasons.values.reduce(0) { $0 + $1.nanoseconds }) / 1e9)

        for (slot, transport) in machine.virtioTransports.enumerated() {
            let device = "\(transport.device.name)\(slot)"
            for q in transport.device.queueMaxSizes.indices {
                guard let traffic = transport.queue(q)?.traffic else { continue }
                let labels = [("device", device), ("queue", "\(q)")]
                counter("swiftvisor_virtio_queue_notifications_total", "Driver notifications per virtqueue.", traffic.notifications, labels)
                counter("swiftvisor_virtio_queue_chains_total", "Descriptor chains taken per virtqueue.", traffic.chains, labels)
                counter("swiftvisor_virtio_queue_bytes_total", "Bytes through each virtqueue by direction.", traffic.bytesToDevice,
                        labels + [("direction", "to_device")])
                counter("swiftvisor_virtio_queue_bytes_total", "Bytes through each virtqueue by direction.", traffic.bytesToDriver,
                        labels + [("direction", "to_driver")])
            }
        }

        if let balloon = machine.balloon {
            gauge("swiftvisor_balloon_target_pages", "Balloon target, 4 KiB pages.", Double(balloon.targetPages))
            gauge("swiftvisor_balloon_actual_pages", "Pages the guest has given the balloon.", Double(balloon.actualPages))
        }

        // The engine updates these from its vCPU threads; a scrape reads whole aligned words,
        // so a value may be one block behind, never torn.
        if let e = machine.executionCounts {
            counter("swiftvisor_instructions_total", "Guest instructions retired (software engine).", e.instructions)
            counter("swiftvisor_translator_blocks_total", "Guest blocks translated to host code.", e.blocksTranslated)
            gauge("swiftvisor_translated_share", "Share of retired instructions that ran as translated code.", e.translatedShare)
        }
        return registry.emitToString()
    }
}
