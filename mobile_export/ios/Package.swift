// swift-tools-version:6.0
// FlashmeshNode: a flashmesh node in Swift that serves an iPhone bundle's expert records
// (`flashmesh export-ios`) over the node protocol (protos/flashmesh.proto). No outside Swift package:
// C libraries come from the system (Debian's -dev packages here, Homebrew's on a Mac) through
// system-library targets. The iOS app (App/project.yml) builds FlashmeshNode and FlashmeshPlatform
// from here and adds gRPC's C core from grpc's own Swift package itself.
import PackageDescription

// The platform choices, in this one place. Conditions name the platform built for; only the macOS
// branch is NOT BUILT on these machines.
let homebrew = ["/opt/homebrew", "/usr/local"]  // Apple silicon, Intel
// BLAS: OpenBLAS on Linux; Accelerate on Apple platforms (FlashmeshNode/Compute/BLAS.swift).
let blasTargets: [Target] = [.systemLibrary(name: "COpenBLAS", providers: [.apt(["libopenblas-dev"])])]
let blas: [Target.Dependency] = [.target(name: "COpenBLAS", condition: .when(platforms: [.linux]))]
// xxhash's header: /usr/include on Linux, Homebrew's include directory on a Mac (for macOS and iOS builds),
// for FlashmeshNode and every target that imports it (the iOS app sets the same in App/project.yml).
let xxhashHeaders: [SwiftSetting] = [
    .unsafeFlags(homebrew.flatMap { ["-Xcc", "-I\($0)/include"] }, .when(platforms: [.macOS, .iOS]))
]
// gRPC's C core: Debian's libgrpc-dev on Linux, Homebrew's grpc on macOS (`brew install grpc`).
let grpcHeaders: [CSetting] = [.unsafeFlags(homebrew.map { "-I\($0)/include" }, .when(platforms: [.macOS]))]
let grpcLibraries: [LinkerSetting] = [
    .linkedLibrary("grpc"), .linkedLibrary("gpr"),
    .unsafeFlags(homebrew.map { "-L\($0)/lib" }, .when(platforms: [.macOS])),
]

let package = Package(
    name: "FlashmeshNode",
    platforms: [.macOS(.v15), .iOS(.v18)],
    products: [
        .library(name: "FlashmeshNode", targets: ["FlashmeshNode"]),
        .library(name: "FlashmeshPlatform", targets: ["FlashmeshPlatform"]),
        .library(name: "FlashmeshGRPC", targets: ["FlashmeshGRPC"]),
        .executable(name: "flashmesh-node", targets: ["FlashmeshNodeCLI"]),
    ],
    targets: blasTargets + [
        .systemLibrary(name: "CXXHash", providers: [.apt(["libxxhash-dev"]), .brew(["xxhash"])]),
        // zlib, for join files (gzip'd tar): Debian's zlib1g-dev; part of the SDK on Apple platforms.
        .systemLibrary(name: "CZlib", providers: [.apt(["zlib1g-dev"])]),
        // The transport: gRPC's C core on every platform, through a small C shim (docs/swift-node.md).
        .target(name: "CGRPCShim", cSettings: grpcHeaders, linkerSettings: grpcLibraries),
        .target(name: "FlashmeshNode", dependencies: ["CXXHash", "CZlib"] + blas, swiftSettings: xxhashHeaders),
        .target(name: "FlashmeshGRPC", dependencies: ["FlashmeshNode", "CGRPCShim"], swiftSettings: xxhashHeaders),
        // Apple-only backends behind the library's protocols (Metal expert compute, Bonjour), compiled
        // out elsewhere, and the one place the platform's parts are chosen.
        .target(
            name: "FlashmeshPlatform", dependencies: ["FlashmeshNode"],
            resources: [.copy("Kernels/expert_kernels.metal")], swiftSettings: xxhashHeaders),
        .executableTarget(
            name: "FlashmeshNodeCLI", dependencies: ["FlashmeshNode", "FlashmeshGRPC", "FlashmeshPlatform"],
            swiftSettings: xxhashHeaders),
        .testTarget(
            name: "FlashmeshNodeTests", dependencies: ["FlashmeshNode", "FlashmeshGRPC", "FlashmeshPlatform"],
            swiftSettings: xxhashHeaders),
    ]
)
