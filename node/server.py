"""The gRPC adapter of a node: maps RPCs onto `NodeService` and `RequestError` onto status codes.

Every RPC must carry the cluster token in the `x-flashmesh-token` metadata entry. gRPC's own
message limit is set a little above the node's validated limit, so an oversized request is
refused (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED from gRPC itself far above it) while the node
keeps serving. With TLS (`flashmesh node serve --tls`) the listener speaks only mutual TLS, and the
token is still checked on every RPC.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from flashmesh.node.service import NodeService, RequestError
from flashmesh.node.tls import TlsIdentity
from flashmesh.protos import LOST_RECORDS_METADATA_KEY, TOKEN_METADATA_KEY
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos import flashmesh_pb2_grpc as pb_grpc
from flashmesh.protos.codec import format_records
from flashmesh.protos.errors import ErrorKind
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)


def _code(kind: ErrorKind) -> grpc.StatusCode:
    return grpc.StatusCode[kind.name]  # ErrorKind names its members after gRPC's status codes


def _token(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata():
        if key == TOKEN_METADATA_KEY:
            return value
    return None


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, service: NodeService) -> None:
        self.service = service

    def _serve(self, context: grpc.ServicerContext, handler, *args):
        try:
            self.service.check_token(_token(context))
            return handler(*args)
        except RequestError as e:
            log.info("refused request: %s", e)
            if e.records:  # which records are damaged, for the coordinator's failover
                context.set_trailing_metadata(((LOST_RECORDS_METADATA_KEY, format_records(e.records)),))
            context.abort(_code(e.kind), str(e))

    def Info(self, request, context):
        return self._serve(context, self.service.info)

    def Compute(self, request, context):
        return self._serve(context, self.service.compute, request)

    def Prefetch(self, request, context):
        return self._serve(context, self.service.prefetch, request)

    def Stats(self, request, context):
        return self._serve(context, self.service.stats)

    def Health(self, request, context):
        return self._serve(context, self.service.health)


def _parsed(method, request_class, service: NodeService):
    """An RPC method that takes the raw request bytes: checks the token, then parses them itself,
    so bytes that are not a valid message get INVALID_ARGUMENT (gRPC's parser would say INTERNAL)."""

    def handle(data: bytes, context: grpc.ServicerContext):
        try:
            service.check_token(_token(context))
            try:
                request = request_class.FromString(data)
            except DecodeError as e:
                raise service.invalid(f"the request is not a valid {request_class.__name__} message ({e})") from None
        except RequestError as e:
            context.abort(_code(e.kind), str(e))
        return method(request, context)

    return handle


def _node_handler(servicer: NodeServicer) -> grpc.GenericRpcHandler:
    """The generated service's methods (same names and messages), with requests parsed by `_parsed`."""
    node = pb.DESCRIPTOR.services_by_name["Node"]
    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            _parsed(getattr(servicer, m.name), getattr(pb, m.input_type.name), servicer.service),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString,
        )
        for m in node.methods
    }
    return grpc.method_handlers_generic_handler(node.full_name, handlers)


# Coordinators ping every 2 s to notice a dropped link (coordinator.client.KEEPALIVE_OPTIONS); gRPC
# servers otherwise answer pings more often than every 5 minutes with GOAWAY.
KEEPALIVE_SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]


def start_server(
    service: NodeService, *, addresses: list[str], port: int = 0, workers: int = 8, tls: TlsIdentity | None = None
) -> tuple[grpc.Server, int]:
    """Serve `service` on each of `addresses` at one port (0 = any free port); return (server, port).
    With `tls`, only mutual TLS: a client must present a coordinator certificate from the cluster CA."""
    limit = service.max_message_bytes + 1024 * 1024
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flashmesh-grpc"),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        + KEEPALIVE_SERVER_OPTIONS,
    )
    server.add_generic_rpc_handlers((_node_handler(NodeServicer(service)),))
    credentials = None
    if tls is not None:
        credentials = grpc.ssl_server_credentials(
            [(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem, require_client_auth=True
        )
    for address in addresses:
        host = f"[{address}]" if ":" in address else address
        endpoint = f"{host}:{port}"
        if credentials is None:
            bound = server.add_insecure_port(endpoint)
        else:
            bound = server.add_secure_port(endpoint, credentials)
        if bound == 0:
            raise OSError(f"cannot listen on {address}:{port}")
        port = bound
    server.start()
    return server, port
