import FlashmeshNode
import FlashmeshPlatform

/// `flashmesh-node`'s command line (the options of `flashmesh node serve --bundle`).
struct Arguments {
    static let usage = """
        usage: flashmesh-node --bundle DIR --ram-budget B [--host ADDR] [--port P] [--token T]
                              [--tls DIR | --join FILE] [--count N --index I [--replicas R]] [--page-cache] [--name NAME]
                              [--max-message B] [--flash-gbps G] [--compute auto|cpu|gpu] [--no-advertise]
        Serves the experts of an iPhone bundle (`flashmesh export-ios`) over the flashmesh node protocol.
          --bundle DIR      the bundle
          --ram-budget B    bytes of expert weights kept in RAM, e.g. 8GB
          --host ADDR       address to listen on (default: 0.0.0.0 with a join file or config of interfaces
                            "auto", else 127.0.0.1)
          --port P          TCP port (default: any free port)
          --token T         the cluster token (default: $FLASHMESH_TOKEN, else the join file's or config's;
                            else one is generated)
          --tls DIR         serve only mutual TLS with this node identity: CLUSTER_DIR/nodes/NAME (default:
                            $FLASHMESH_TLS, else the config of `flashmesh cluster join`, else plaintext)
          --join FILE       the join file of `flashmesh cluster add-node NAME`: its token, name and identity
                            (mutual TLS), used in place instead of the config
          --count N --index I [--replicas R]
                            serve the experts `flashmesh shard --count N --index I` would hold
          --page-cache      let the OS page cache help (default: bypass it)
          --name NAME       node name (default: the config's, else the certificate's, else the host name)
          --max-message B   largest request accepted (default 256MiB)
          --flash-gbps G    report this read bandwidth instead of measuring
          --compute C       experts on the GPU (Metal, Apple platforms) or CPU; auto: the GPU where
                            there is one, checked against the CPU on first use (default auto)
          --no-advertise    do not advertise by Bonjour (macOS advertises on the interface of --host;
                            Linux never advertises: give the coordinator --node HOST:PORT)
        """

    var bundle: String?
    var host: String?
    var tls: String?
    var join: String?
    var port = 0
    var token: String?
    var ramBudget: Int?
    var count: Int?
    var index: Int?
    var replicas = 1
    var pageCache = false
    var name: String?
    var maxMessage = NodeMetadata.defaultMaxMessageBytes
    var flashGBps: Double?
    var compute = ComputePreference.auto
    var advertise = true
    var parentPid: Int32?
    var help = false

    static func parse(_ argv: [String]) throws(UserError) -> Arguments {
        var args = Arguments()
        var rest = argv[...]
        func value(_ flag: String) throws(UserError) -> String {
            guard let v = rest.popFirst() else { throw UserError("\(flag) needs a value") }
            return v
        }
        func number<T: LosslessStringConvertible>(_ flag: String, _ type: T.Type) throws(UserError) -> T {
            let text = try value(flag)
            guard let n = T(text) else { throw UserError("\(flag) takes a number, not '\(text)'") }
            return n
        }
        while let flag = rest.popFirst() {
            switch flag {
            case "--bundle": args.bundle = try value(flag)
            case "--host": args.host = try value(flag)
            case "--port": args.port = try number(flag, Int.self)
            case "--token": args.token = try value(flag)
            case "--tls": args.tls = try value(flag)
            case "--join": args.join = try value(flag)
            case "--ram-budget": args.ramBudget = try ByteSize.parse(try value(flag))
            case "--count": args.count = try number(flag, Int.self)
            case "--index": args.index = try number(flag, Int.self)
            case "--replicas": args.replicas = try number(flag, Int.self)
            case "--page-cache": args.pageCache = true
            case "--name": args.name = try value(flag)
            case "--max-message": args.maxMessage = try ByteSize.parse(try value(flag))
            case "--flash-gbps": args.flashGBps = try number(flag, Double.self)
            case "--compute":
                let text = try value(flag)
                guard let choice = ComputePreference(rawValue: text) else {
                    throw UserError("--compute takes auto, cpu or gpu, not '\(text)'")
                }
                args.compute = choice
            case "--no-advertise": args.advertise = false
            case "--parent-pid": args.parentPid = try number(flag, Int32.self)  // exit when this process goes
            case "-h", "--help": args.help = true
            default: throw UserError("unknown option \(flag); see flashmesh-node --help")
            }
        }
        if args.help { return args }
        guard args.bundle != nil else { throw UserError("give the bundle to serve: --bundle OUT.flashmesh-ios") }
        guard args.ramBudget != nil else { throw UserError("give the RAM budget: --ram-budget 8GB") }
        guard (0...65535).contains(args.port) else { throw UserError("--port must be in 0..65535, got \(args.port)") }
        guard args.tls == nil || args.join == nil else {
            throw UserError("give --tls DIR or --join FILE, not both (a join file holds its identity)")
        }
        guard (args.count == nil) == (args.index == nil) else {
            throw UserError("--count and --index go together")
        }
        return args
    }

    func shard() throws(UserError) -> Shard? {
        guard let count, let index else { return nil }
        return try Shard(count: count, index: index, replicas: replicas)
    }
}
