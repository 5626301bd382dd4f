import Foundation

/// The bundles and join files in a folder (the app's Documents, where Finder file sharing and the Files app put them).
public enum BundleLibrary {
    /// Paths of the folder's subfolders that hold a manifest.json, by name.
    public static func bundles(in folder: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
        return names.sorted().map { folder + "/" + $0 }.filter {
            FileManager.default.fileExists(atPath: $0 + "/manifest.json")
        }
    }

    /// Paths of the folder's join files (`flashmesh cluster add-node NAME` writes NAME.flashmesh-join), by name.
    public static func joinFiles(in folder: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
        return names.sorted().filter { $0.hasSuffix(JoinFile.suffix) }.map { folder + "/" + $0 }
    }
}
