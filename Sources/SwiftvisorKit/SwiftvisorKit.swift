// The library product for other packages: one import brings the engine-neutral model
// (VirtCore), the devices, the VMM (machines, engine selection, snapshots, services) and the
// bundled guests, and confidential VMs' attestation. Engines are chosen through `EngineSelection`, never named.
@_exported import Attestation
@_exported import Devices
@_exported import GuestImages
@_exported import VirtCore
@_exported import VMM
