// The server half of gRPC's C core, reduced to what a unary-RPC node needs (see fm_grpc.h).
#include "fm_grpc.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ARMED_CALLS = 16 };  // calls requested ahead, so that new calls never wait for a request_call

typedef enum { WAITING, RECEIVING, HANDLING, FINISHING } phase_t;

struct fm_call {
  fm_server *server;
  phase_t phase;
  grpc_call *call;
  grpc_call_details details;
  grpc_metadata_array request_metadata;
  grpc_byte_buffer *request;
  grpc_slice request_bytes;
  char *method;
  // what the answer sends; alive until gRPC reports it sent
  grpc_byte_buffer *reply;
  grpc_slice status_details;
  grpc_metadata trailer;
  int has_trailer;
  int cancelled;
};

struct fm_server {
  grpc_server *server;
  grpc_completion_queue *cq;
  atomic_int shutting_down;
  atomic_int shutdown_sent;
  gpr_timespec cancel_at;
  int cancelled_all;
  char shutdown_tag;  // its address tags the server's shutdown notification
};

static void arm(fm_server *s);

static void free_call(fm_call *c) {
  if (c->call != NULL) grpc_call_unref(c->call);
  grpc_call_details_destroy(&c->details);
  grpc_metadata_array_destroy(&c->request_metadata);
  if (c->request != NULL) grpc_byte_buffer_destroy(c->request);
  grpc_slice_unref(c->request_bytes);
  if (c->reply != NULL) grpc_byte_buffer_destroy(c->reply);
  grpc_slice_unref(c->status_details);
  if (c->has_trailer) {
    grpc_slice_unref(c->trailer.key);
    grpc_slice_unref(c->trailer.value);
  }
  free(c->method);
  free(c);
}

static void arm(fm_server *s) {
  if (atomic_load(&s->shutting_down)) return;
  fm_call *c = calloc(1, sizeof(fm_call));
  if (c == NULL) return;
  c->server = s;
  c->phase = WAITING;
  c->request_bytes = grpc_empty_slice();
  c->status_details = grpc_empty_slice();
  grpc_call_details_init(&c->details);
  grpc_metadata_array_init(&c->request_metadata);
  if (grpc_server_request_call(s->server, &c->call, &c->details, &c->request_metadata, s->cq, s->cq, c) !=
      GRPC_CALL_OK) {
    free_call(c);
  }
}

static grpc_server_credentials *credentials_for(const fm_tls *tls) {
  if (tls == NULL) return grpc_insecure_server_credentials_create();
  grpc_ssl_pem_key_cert_pair pair = {tls->key_pem, tls->cert_pem};
  return grpc_ssl_server_credentials_create_ex(tls->ca_pem, &pair, 1,
                                               GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY, NULL);
}

fm_server *fm_server_start(const char *address, int max_message_bytes, const fm_tls *tls, int *bound_port,
                           char *error, size_t error_size) {
  grpc_init();
  grpc_arg args[3];
  args[0].type = GRPC_ARG_INTEGER;
  args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
  args[0].value.integer = max_message_bytes;
  args[1].type = GRPC_ARG_INTEGER;
  args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
  args[1].value.integer = max_message_bytes;
  args[2].type = GRPC_ARG_INTEGER;  // a port another process holds is an error, not a shared socket
  args[2].key = GRPC_ARG_ALLOW_REUSEPORT;
  args[2].value.integer = 0;
  grpc_channel_args channel_args = {3, args};

  fm_server *s = calloc(1, sizeof(fm_server));
  if (s == NULL) {
    snprintf(error, error_size, "out of memory");
    grpc_shutdown();
    return NULL;
  }
  s->server = grpc_server_create(&channel_args, NULL);
  s->cq = grpc_completion_queue_create_for_next(NULL);
  grpc_server_register_completion_queue(s->server, s->cq, NULL);
  grpc_server_credentials *credentials = credentials_for(tls);
  int port = credentials != NULL ? grpc_server_add_http2_port(s->server, address, credentials) : 0;
  if (credentials != NULL) grpc_server_credentials_release(credentials);
  if (port == 0) {
    snprintf(error, error_size, "cannot listen on %s (address in use or not available%s)", address,
             tls != NULL ? ", or gRPC refused the certificate and key" : "");
    grpc_server_destroy(s->server);
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(s->cq);
    free(s);
    grpc_shutdown();
    return NULL;
  }
  grpc_server_start(s->server);
  for (int i = 0; i < ARMED_CALLS; i++) arm(s);
  *bound_port = port;
  return s;
}

// The request has arrived (or the call failed before it did).
static fm_call *received(fm_call *c, int success) {
  if (!success || c->request == NULL) {
    // cancelled, cut, over the size limit (gRPC has answered it) or no message at all
    fm_call_finish(c, GRPC_STATUS_INVALID_ARGUMENT, NULL, 0, "the call carried no request message", NULL, NULL);
    return NULL;
  }
  grpc_byte_buffer_reader reader;
  if (!grpc_byte_buffer_reader_init(&reader, c->request)) {
    fm_call_finish(c, GRPC_STATUS_INTERNAL, NULL, 0, "cannot read the request message", NULL, NULL);
    return NULL;
  }
  c->request_bytes = grpc_byte_buffer_reader_readall(&reader);
  grpc_byte_buffer_reader_destroy(&reader);
  c->phase = HANDLING;
  return c;
}

static fm_call *started(fm_call *c, int success) {
  fm_server *s = c->server;
  if (!success) {  // the server is shutting down: this requested call never came
    free_call(c);
    return NULL;
  }
  arm(s);
  size_t n = GRPC_SLICE_LENGTH(c->details.method);
  c->method = malloc(n + 1);
  if (c->method == NULL) {
    fm_call_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, NULL, 0, "out of memory", NULL, NULL);
    return NULL;
  }
  memcpy(c->method, GRPC_SLICE_START_PTR(c->details.method), n);
  c->method[n] = 0;
  grpc_op ops[2];
  memset(ops, 0, sizeof(ops));
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_RECV_MESSAGE;
  ops[1].data.recv_message.recv_message = &c->request;
  c->phase = RECEIVING;
  if (grpc_call_start_batch(c->call, ops, 2, c, NULL) != GRPC_CALL_OK) {
    c->phase = HANDLING;
    fm_call_finish(c, GRPC_STATUS_INTERNAL, NULL, 0, "cannot receive the request", NULL, NULL);
  }
  return NULL;
}

// Sends the shutdown request once it is asked for, and cancels what is left after the grace.
static void advance_shutdown(fm_server *s) {
  if (!atomic_load(&s->shutting_down)) return;
  if (!atomic_exchange(&s->shutdown_sent, 1)) grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
  if (!s->cancelled_all && gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), s->cancel_at) > 0) {
    grpc_server_cancel_all_calls(s->server);
    s->cancelled_all = 1;
  }
}

fm_call *fm_server_next_call(fm_server *s) {
  for (;;) {
    advance_shutdown(s);
    gpr_timespec wait = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(100, GPR_TIMESPAN));
    grpc_event ev = grpc_completion_queue_next(s->cq, wait, NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) return NULL;
    if (ev.type == GRPC_QUEUE_TIMEOUT) continue;
    if (ev.tag == &s->shutdown_tag) {
      grpc_completion_queue_shutdown(s->cq);
      continue;
    }
    fm_call *c = ev.tag;
    fm_call *ready = NULL;
    switch (c->phase) {
      case WAITING:
        ready = started(c, ev.success);
        break;
      case RECEIVING:
        ready = received(c, ev.success);
        break;
      case FINISHING:
        free_call(c);
        break;
      case HANDLING:  // no batch is in flight while Swift handles a call
        break;
    }
    if (ready != NULL) return ready;
  }
}

void fm_server_shutdown(fm_server *s, double grace_seconds) {
  s->cancel_at = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis((int64_t)(grace_seconds * 1000), GPR_TIMESPAN));
  atomic_store(&s->shutting_down, 1);  // the loop sends the shutdown request on its next turn
}

void fm_server_destroy(fm_server *s) {
  grpc_server_destroy(s->server);
  grpc_completion_queue_destroy(s->cq);
  free(s);
  grpc_shutdown();
}

const char *fm_call_method(const fm_call *c) { return c->method != NULL ? c->method : ""; }

const uint8_t *fm_call_request(const fm_call *c, size_t *length) {
  *length = GRPC_SLICE_LENGTH(c->request_bytes);
  return GRPC_SLICE_START_PTR(c->request_bytes);
}

const uint8_t *fm_call_metadata(const fm_call *c, const char *key, size_t *length) {
  size_t n = strlen(key);
  for (size_t i = 0; i < c->request_metadata.count; i++) {
    const grpc_metadata *m = &c->request_metadata.metadata[i];
    if (GRPC_SLICE_LENGTH(m->key) == n && memcmp(GRPC_SLICE_START_PTR(m->key), key, n) == 0) {
      *length = GRPC_SLICE_LENGTH(m->value);
      return GRPC_SLICE_START_PTR(m->value);
    }
  }
  *length = 0;
  return NULL;
}

int fm_call_finish(fm_call *c, int status, const uint8_t *reply, size_t length, const char *details,
                   const char *trailer_key, const char *trailer_value) {
  grpc_op ops[3];
  memset(ops, 0, sizeof(ops));
  size_t n = 0;
  if (status == GRPC_STATUS_OK) {
    grpc_slice bytes = grpc_slice_from_copied_buffer((const char *)reply, length);
    c->reply = grpc_raw_byte_buffer_create(&bytes, 1);
    grpc_slice_unref(bytes);
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = c->reply;
    n++;
  }
  c->status_details = grpc_slice_from_copied_string(details != NULL ? details : "");
  if (status != GRPC_STATUS_OK && trailer_key != NULL && trailer_value != NULL) {
    c->trailer.key = grpc_slice_from_copied_string(trailer_key);
    c->trailer.value = grpc_slice_from_copied_string(trailer_value);
    c->has_trailer = 1;
  }
  ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[n].data.send_status_from_server.status = (grpc_status_code)status;
  ops[n].data.send_status_from_server.status_details = &c->status_details;
  ops[n].data.send_status_from_server.trailing_metadata_count = c->has_trailer ? 1 : 0;
  ops[n].data.send_status_from_server.trailing_metadata = c->has_trailer ? &c->trailer : NULL;
  n++;
  ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  ops[n].data.recv_close_on_server.cancelled = &c->cancelled;
  n++;
  c->phase = FINISHING;
  grpc_call_error rc = grpc_call_start_batch(c->call, ops, n, c, NULL);
  if (rc != GRPC_CALL_OK) free_call(c);  // nothing will complete for this tag
  return rc == GRPC_CALL_OK ? 0 : (int)rc;
}
