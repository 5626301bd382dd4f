#!/usr/bin/env bash
# Type-checks the Swift written only for Apple platforms (the iOS app, FlashmeshPlatform's Metal and
# Bonjour code, the transport as the app compiles it) on Linux, against the TYPE-CHECK STUBS in stubs/
# (hand transcriptions of Apple's documented Swift API, no implementations) and the real FlashmeshNode
# module of `swift build -c release`. It proves our sources are well-typed against that transcription and
# against the real library; it proves nothing about Apple's actual SDK, the Metal shader compiler, or
# behaviour on a device. Usage: tools/apple-typecheck/run.sh (from mobile_export/ios, after the build).
set -euo pipefail
cd "$(dirname "$0")/../.."
SWIFTC="${SWIFTC:-$(dirname "$(command -v swift || echo /opt/swift/usr/bin/swift)")/swiftc}"
BUILD=.build/release
OUT=.build/apple-typecheck
rm -rf "$OUT" && mkdir -p "$OUT"
common=(-swift-version 6 -I "$OUT" -I "$BUILD/Modules"
    -Xcc -fmodule-map-file=Sources/CXXHash/module.modulemap -Xcc -fmodule-map-file=Sources/COpenBLAS/module.modulemap
    -Xcc -fmodule-map-file=Sources/CZlib/module.modulemap)
for stub in UniformTypeIdentifiers Metal dnssd UIKit SwiftUI; do
    "$SWIFTC" -emit-module -parse-as-library -module-name "$stub" "${common[@]}" \
        -emit-module-path "$OUT/$stub.swiftmodule" "tools/apple-typecheck/stubs/$stub.swift"
done
# FlashmeshPlatform with Metal and dnssd importable: its Apple-only files are compiled in.
"$SWIFTC" -emit-module -parse-as-library -module-name FlashmeshPlatform "${common[@]}" \
    -emit-module-path "$OUT/FlashmeshPlatform.swiftmodule" \
    Sources/FlashmeshPlatform/*.swift "$BUILD/FlashmeshPlatform.build/DerivedSources/resource_bundle_accessor.swift"
# The app, with the transport and the C shim's header as the app target compiles them (App/project.yml).
"$SWIFTC" -typecheck -parse-as-library -module-name FlashmeshNodeApp "${common[@]}" \
    -import-objc-header Sources/CGRPCShim/include/fm_grpc.h \
    App/Sources/*.swift Sources/FlashmeshGRPC/GRPCCoreTransport.swift
echo "apple-typecheck: FlashmeshPlatform (Metal, Bonjour) and the app type-check against the stubs"
