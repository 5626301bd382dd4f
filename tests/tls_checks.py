"""What every mutual-TLS node must refuse, the Python node's (tests/test_tls.py) and the Swift node's
(tests/test_swift_tls.py) alike: clients without a certificate from the cluster CA, and calls without the
token even over TLS; and what a coordinator then says (one line with the fix)."""

from __future__ import annotations

import grpc
import pytest
from flashmesh.coordinator.client import NodeClient, NodeError
from flashmesh.coordinator.discovery import NodeAddress
from flashmesh.node.tls import TlsIdentity
from flashmesh.protos import TOKEN_METADATA_KEY
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos import flashmesh_pb2_grpc as pb_grpc


def info(channel: grpc.Channel, metadata) -> pb.NodeInfo:
    try:
        return pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), metadata=metadata, timeout=10)
    finally:
        channel.close()


def secure(target: str, identity: TlsIdentity, *, root=None, with_cert: bool = True) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root or identity.ca_pem,
        private_key=identity.key_pem if with_cert else None,
        certificate_chain=identity.cert_pem if with_cert else None,
    )
    return grpc.secure_channel(target, credentials)


def assert_only_cluster_clients(
    address: NodeAddress, *, token: str, identity: TlsIdentity, other: TlsIdentity, spare: TlsIdentity
) -> None:
    """`identity`: the cluster's coordinator; `other`: a coordinator of another CA; `spare`: a node's."""
    target, metadata = address.target, ((TOKEN_METADATA_KEY, token),)
    assert info(secure(target, identity), metadata).name == address.name
    for channel in (
        grpc.insecure_channel(target),  # plaintext
        secure(target, identity, with_cert=False),  # TLS, no client certificate
        secure(target, other, root=identity.ca_pem),  # a client certificate from another CA
        secure(target, spare),  # a node's (server) certificate used as a client's
    ):
        with pytest.raises(grpc.RpcError) as e:
            info(channel, metadata)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # refused in the handshake, before any RPC
    for wrong in ((), ((TOKEN_METADATA_KEY, "wrong"),)):  # TLS does not replace the token
        with pytest.raises(grpc.RpcError) as e:
            info(secure(target, identity), wrong)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for tls, needle in ((None, "--tls"), (other, "TLS")):  # what a coordinator says: one line with the fix
        client = NodeClient(address, token=token, tls=tls)
        with pytest.raises(NodeError) as e:
            client.info(timeout=10)
        client.close()
        message = str(e.value)
        assert target in message and needle in message and "\n" not in message
