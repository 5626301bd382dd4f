// The app's one screen: bundle, share, budget, cluster token, start/stop, live statistics. Views only
// display the controller's state and call its methods.
import FlashmeshNode
import Foundation
import SwiftUI
import UIKit
import UniformTypeIdentifiers

struct NodeScreen: View {
    @Bindable var controller: NodeController
    @State private var picking = false
    @State private var picked: URL?  // a folder chosen in Files, held open while it is the bundle
    @State private var pickingJoin = false

    var body: some View {
        NavigationStack {
            Form {
                bundleSection
                if let bundle = controller.bundle {
                    shareSection(bundle)
                    budgetSection
                }
                clusterSection
                servingSection
                if let stats = controller.stats { statisticsSection(stats) }
            }
            .navigationTitle("flashmesh node")
            .fileImporter(isPresented: $picking, allowedContentTypes: [.folder]) { result in
                guard case let .success(url) = result else { return }
                picked?.stopAccessingSecurityScopedResource()
                picked = url.startAccessingSecurityScopedResource() ? url : nil
                Task { await controller.openBundle(url.path) }
            }
        }
    }

    private var bundleSection: some View {
        Section("Bundle") {
            ForEach(BundleLibrary.bundles(in: documentsPath), id: \.self) { path in
                Button(URL(fileURLWithPath: path).lastPathComponent) { Task { await controller.openBundle(path) } }
                    .disabled(!controller.canEdit)
            }
            Button("Choose a bundle in Files…") { picking = true }.disabled(!controller.canEdit)
            if let bundle = controller.bundle {
                LabeledContent("Model", value: "\(bundle.modelType) \(bundle.fingerprint.prefix(12))")
                LabeledContent("Experts", value: "\(bundle.expertsHeld) of \(bundle.expertsTotal) in \(bundle.layers) layers")
                LabeledContent("Weights", value: bundle.weights)
                LabeledContent("Flash per token", value: ByteSize.format(bundle.bytesPerToken))
            }
        }
    }

    private func shareSection(_ bundle: BundleSummary) -> some View {
        Section {
            Stepper("Machines sharing it: \(controller.settings.shareCount)", value: shareBinding(\.shareCount), in: 1...64)
            if controller.settings.shareCount > 1 {
                Stepper(
                    "This phone's share: \(controller.settings.shareIndex + 1)", value: shareBinding(\.shareIndex),
                    in: 0...(controller.settings.shareCount - 1))
                Stepper("Copies of each expert: \(controller.settings.replicas)", value: shareBinding(\.replicas),
                        in: 1...controller.settings.shareCount)
            }
        } header: {
            Text("Share")
        } footer: {
            Text(bundle.shareText)
        }
        .disabled(!controller.canEdit)
    }

    private var budgetSection: some View {
        Section {
            if let bounds = controller.bounds, bounds.isPossible, bounds.maximum > bounds.minimum {
                Slider(
                    value: Binding(
                        get: { Double(controller.effectiveBudget) }, set: { controller.setBudget(Int($0)) }),
                    in: Double(bounds.minimum)...Double(bounds.maximum))
            }
        } header: {
            Text("RAM for experts: \(ByteSize.format(controller.effectiveBudget))")
        } footer: {
            if let bounds = controller.bounds {
                Text("From \(ByteSize.format(bounds.minimum)) to \(ByteSize.format(bounds.maximum)), what this iPhone allows the app")
            }
        }
        .disabled(!controller.canEdit)
    }

    private var clusterSection: some View {
        Section("Cluster") {
            TextField("Cluster token", text: $controller.settings.token)
                .textInputAutocapitalization(.never)
                .autocorrectionDisabled()
                .font(.body.monospaced())
            HStack {
                Button("Paste") { controller.settings.token = UIPasteboard.general.string ?? "" }
                Spacer()
                Button("New token") { controller.generateToken() }
            }
            TextField("Node name", text: $controller.settings.name)
            // A cluster made by `flashmesh cluster init` speaks mutual TLS only: join it with the file
            // `flashmesh cluster add-node NAME` wrote (token, name and certificate in one).
            ForEach(BundleLibrary.joinFiles(in: documentsPath), id: \.self) { path in
                Button("Join with \(URL(fileURLWithPath: path).lastPathComponent)") { join(path) }
            }
            Button("Choose a join file in Files…") { pickingJoin = true }
            if controller.settings.tls != nil {
                LabeledContent("Security", value: "mutual TLS as \(controller.settings.name)")
                Button("Leave the cluster (plaintext, token only)", role: .destructive) { controller.leaveCluster() }
            }
        }
        .disabled(!controller.canEdit)
        .fileImporter(isPresented: $pickingJoin, allowedContentTypes: [UTType(filenameExtension: "flashmesh-join") ?? .data]) {
            result in
            guard case let .success(url) = result else { return }
            let scoped = url.startAccessingSecurityScopedResource()  // read once: the identity is copied in
            Task {
                await controller.importJoinFile(url.path, keepIn: NodeScreen.identityHome)
                if scoped { url.stopAccessingSecurityScopedResource() }
            }
        }
    }

    private func join(_ path: String) {
        Task { await controller.importJoinFile(path, keepIn: NodeScreen.identityHome) }
    }

    /// Where the joined identity is kept: the app's Application Support, never shared by Finder.
    static var identityHome: String {
        FileManager.default.urls(for: .applicationSupportDirectory, in: .userDomainMask)[0].path + "/flashmesh"
    }

    private var servingSection: some View {
        Section("Serving") {
            switch controller.phase {
            case .idle:
                Button("Start serving") { Task { await controller.start() } }.disabled(!controller.canStart)
            case .starting:
                ProgressView("Opening the share and allocating the cache…")
            case .stopping:
                ProgressView("Finishing the calls in flight…")
            case let .serving(info):
                Button("Stop serving", role: .destructive) { Task { await controller.stop() } }
                LabeledContent("Serving", value: "\(info.expertsHeld) of \(info.expertsTotal) experts")
                LabeledContent("RAM budget", value: ByteSize.format(info.budgetBytes))
                LabeledContent("Compute", value: info.compute)
                LabeledContent("Security", value: info.security)
                Text(info.discovery).font(.footnote)
                ForEach(info.addresses, id: \.self) { Text("--node \($0)").font(.footnote.monospaced()) }
            }
            if let notice = controller.notice {
                Text(notice).foregroundStyle(.orange)
            }
        }
    }

    private func statisticsSection(_ stats: StatsDisplay) -> some View {
        Section("Statistics") {
            LabeledContent("Requests", value: "\(stats.requests) (\(stats.requestsPerSecond)/s)")
            LabeledContent("Cache hit rate", value: stats.hitRate)
            LabeledContent("Flash read", value: "\(stats.readGBps), \(stats.bytesRead) in all")
            LabeledContent("RPC latency", value: stats.latency)
            LabeledContent("Cache", value: stats.cache)
            LabeledContent("Refused", value: stats.rejected)
        }
    }

    private var documentsPath: String {
        FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0].path
    }

    /// A share setting edited by a stepper: changing it reopens the bundle's share.
    private func shareBinding(_ key: WritableKeyPath<ServeSettings, Int>) -> Binding<Int> {
        Binding(
            get: { controller.settings[keyPath: key] },
            set: { value in
                var s = controller.settings
                s[keyPath: key] = value
                Task { await controller.setShare(count: s.shareCount, index: s.shareIndex, replicas: s.replicas) }
            })
    }
}
