/* Handlers of host requests (request.c), called by the dispatcher in serve.c. */
#ifndef VMR_REQUEST_H
#define VMR_REQUEST_H

#include "channel.h"

void request_exec(uint32_t id, const uint8_t *body, size_t len);
void request_file_read(uint32_t id, const uint8_t *body, size_t len);
void request_file_write(uint32_t id, const uint8_t *body, size_t len);
void request_port_connect(uint32_t id, const uint8_t *body, size_t len);
/* Answered at once: EXIT CODE 0 once mounted, or ERROR; no channel stays open. */
void request_mount(uint32_t id, const uint8_t *body, size_t len);
void request_stdin(struct channel *ch, const uint8_t *data, size_t len);
void request_stdin_eof(struct channel *ch);
void request_window(struct channel *ch, const uint8_t *body, size_t len);
void request_signal(struct channel *ch, const uint8_t *body, size_t len);
void request_resize(struct channel *ch, const uint8_t *body, size_t len);
void request_abort(struct channel *ch, size_t len);
void request_freeze(uint32_t id, const uint8_t *body, size_t len);
void request_thaw(uint32_t id, size_t len);
/* A parked detached exec (field PID) joins this connection on the new id. */
void request_adopt(uint32_t id, const uint8_t *body, size_t len);
/* Answered at once like FREEZE: a fresh RNG seed, clock, hostname and/or machine-id. */
void request_identity(uint32_t id, const uint8_t *body, size_t len);

#endif
