// swift-tools-version:6.0
// FlashmeshNode: a flashmesh node in Swift that serves an iPhone bundle's expert records
// (`flashmesh export-ios`) over the node protocol (protos/flashmesh.proto). No outside Swift package:
// C libraries come from the system (Debian's -dev packages here) through system-library targets.
import PackageDescription

// The platform choices, in this one place.
#if os(Linux)
// CBLAS from OpenBLAS; gRPC's C core from Debian's libgrpc-dev (headers in /usr/include).
let blas: [Target.Dependency] = [.target(name: "COpenBLAS", condition: .when(platforms: [.linux]))]
let blasTargets: [Target] = [.systemLibrary(name: "COpenBLAS", providers: [.apt(["libopenblas-dev"])])]
let grpcHeaders: [CSetting] = []
let grpcLibraries: [LinkerSetting] = [.linkedLibrary("grpc"), .linkedLibrary("gpr")]
#else
// Apple platforms, NOT BUILT on these machines: Accelerate for BLAS (FlashmeshNode/Compute/BLAS.swift);
// the same gRPC C core, from Homebrew on macOS (`brew install grpc xxhash`). An iOS app links gRPC's C
// core and xxhash built for iOS in place of these paths.
let blas: [Target.Dependency] = []
let blasTargets: [Target] = []
let grpcHeaders: [CSetting] = [.unsafeFlags(["-I/opt/homebrew/include"])]
let grpcLibraries: [LinkerSetting] = [
    .linkedLibrary("grpc"), .linkedLibrary("gpr"), .unsafeFlags(["-L/opt/homebrew/lib"]),
]
#endif

let package = Package(
    name: "FlashmeshNode",
    platforms: [.macOS(.v15), .iOS(.v18)],
    products: [
        .library(name: "FlashmeshNode", targets: ["FlashmeshNode"]),
        .library(name: "FlashmeshGRPC", targets: ["FlashmeshGRPC"]),
        .executable(name: "flashmesh-node", targets: ["FlashmeshNodeCLI"]),
    ],
    targets: blasTargets + [
        .systemLibrary(name: "CXXHash", pkgConfig: "libxxhash", providers: [.apt(["libxxhash-dev"]), .brew(["xxhash"])]),
        // The transport: gRPC's C core on every platform, through a small C shim (docs/swift-node.md).
        .target(name: "CGRPCShim", cSettings: grpcHeaders, linkerSettings: grpcLibraries),
        .target(name: "FlashmeshNode", dependencies: ["CXXHash"] + blas),
        .target(name: "FlashmeshGRPC", dependencies: ["FlashmeshNode", "CGRPCShim"]),
        .executableTarget(name: "FlashmeshNodeCLI", dependencies: ["FlashmeshNode", "FlashmeshGRPC"]),
        .testTarget(name: "FlashmeshNodeTests", dependencies: ["FlashmeshNode", "FlashmeshGRPC"]),
    ]
)
