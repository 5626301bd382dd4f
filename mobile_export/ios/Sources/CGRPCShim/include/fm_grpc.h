// A small C shim over gRPC's C core: a unary-call server with one completion queue.
//
// One thread loops in fm_server_next_call, which drives the completion queue and returns each call
// once its whole request message has arrived. Any thread then answers it with fm_call_finish
// (reply bytes or a status, details and one trailing metadata entry); the loop frees it when gRPC
// reports the answer sent. Swift sees only these functions and plain C types.
#ifndef FM_GRPC_H
#define FM_GRPC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fm_server fm_server;
typedef struct fm_call fm_call;

// Mutual TLS as `flashmesh node serve --tls` serves it: this node's certificate and key, and the
// cluster CA that every client's certificate must come from (PEM text, NUL-terminated).
typedef struct {
  const char *ca_pem;
  const char *cert_pem;
  const char *key_pem;
} fm_tls;

// Listens on `address` ("HOST:PORT", port 0 = any free one), in plaintext when `tls` is NULL, else
// only mutual TLS (a client without a certificate from the CA is refused in the handshake); messages
// above `max_message_bytes` are refused by gRPC itself (RESOURCE_EXHAUSTED). Returns NULL and writes
// one line into `error` when it cannot listen. `*bound_port` is the port it listens on.
fm_server *fm_server_start(const char *address, int max_message_bytes, const fm_tls *tls, int *bound_port,
                           char *error, size_t error_size);

// Blocks until a call's request has arrived (returned; answer it with fm_call_finish) or the
// server has shut down and every call is done (NULL). Call from one thread only.
fm_call *fm_server_next_call(fm_server *server);

// Stops taking calls; calls in flight may finish for `grace_seconds`, then they are cancelled.
// fm_server_next_call returns NULL once all are done. Thread-safe.
void fm_server_shutdown(fm_server *server, double grace_seconds);

// Frees the server; only after fm_server_next_call returned NULL.
void fm_server_destroy(fm_server *server);

// The call's method ("/flashmesh.v1.Node/Info"), NUL-terminated.
const char *fm_call_method(const fm_call *call);

// The request message's bytes (valid until fm_call_finish).
const uint8_t *fm_call_request(const fm_call *call, size_t *length);

// The first value of request metadata `key` (lower case), or NULL; `*length` is its length.
const uint8_t *fm_call_metadata(const fm_call *call, const char *key, size_t *length);

// Answers the call: `status` 0 sends `reply` (length bytes), any other code sends `details` and, if
// `trailer_key` is not NULL, one trailing metadata entry. The call must not be used afterwards.
// Returns 0, or a gRPC call error code (the call is still released).
int fm_call_finish(fm_call *call, int status, const uint8_t *reply, size_t length, const char *details,
                   const char *trailer_key, const char *trailer_value);

#ifdef __cplusplus
}
#endif

#endif
