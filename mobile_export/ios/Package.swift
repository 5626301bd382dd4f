// swift-tools-version:6.0
// FlashmeshNode: a flashmesh node in Swift that serves an iPhone bundle's expert records
// (`flashmesh export-ios`) over the node protocol (protos/flashmesh.proto). No outside Swift package:
// C libraries come from the system (Debian's -dev packages here) through system-library targets.
import PackageDescription

#if os(Linux)
// Linux: CBLAS from OpenBLAS. Apple platforms use Accelerate instead (FlashmeshNode/Compute/BLAS.swift).
let blas: [Target.Dependency] = [.target(name: "COpenBLAS", condition: .when(platforms: [.linux]))]
let blasTargets: [Target] = [.systemLibrary(name: "COpenBLAS", providers: [.apt(["libopenblas-dev"])])]
#else
let blas: [Target.Dependency] = []
let blasTargets: [Target] = []
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
        .systemLibrary(name: "CXXHash", providers: [.apt(["libxxhash-dev"]), .brew(["xxhash"])]),
        // The transport: gRPC's C core, the one choice for every platform (docs/ios.md, "The Swift node").
        // Here it is Debian's libgrpc-dev (headers in /usr/include); an Apple build links gRPC's C core
        // built for that platform (not built on these machines).
        .target(name: "CGRPCShim", linkerSettings: [.linkedLibrary("grpc"), .linkedLibrary("gpr")]),
        .target(name: "FlashmeshNode", dependencies: ["CXXHash"] + blas),
        .target(name: "FlashmeshGRPC", dependencies: ["FlashmeshNode", "CGRPCShim"]),
        .executableTarget(name: "FlashmeshNodeCLI", dependencies: ["FlashmeshNode", "FlashmeshGRPC"]),
        .testTarget(name: "FlashmeshNodeTests", dependencies: ["FlashmeshNode", "FlashmeshGRPC"]),
    ]
)
