"""The node protocol: flashmesh.proto, its generated modules, the array codec and shared constants;
and what every part shares: the user error and the node error kinds (errors.py), byte sizes (sizes.py)."""

PROTOCOL_VERSION = 1
SERVICE_TYPE = "_flashmesh._tcp.local."
TOKEN_METADATA_KEY = "x-flashmesh-token"  # gRPC metadata entry carrying the cluster token
LOST_RECORDS_METADATA_KEY = "x-flashmesh-lost-records"  # DATA_LOSS trailer: "layer:expert,..."
TOKEN_ENV = "FLASHMESH_TOKEN"
TLS_ENV = "FLASHMESH_TLS"  # default for --tls (a node's or the coordinator's certificate directory)
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
