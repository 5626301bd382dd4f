/* fio's libaio loop with a chosen number of destination buffers: `python -m bench io-footprint`.
 *
 * fio reads into its `iodepth` buffers over and over; a reader that lands records in a cache's
 * slots writes to many more. On a VM's virtual disk the destination's footprint changes the rate,
 * so this is the yardstick at the engine's footprint: one thread, io_submit / io_getevents, random
 * record offsets, O_DIRECT. PAGES is 4k, or huge (transparent huge pages, as the cache's slabs use:
 * each record then reaches the disk in fewer segments). Usage:
 * aio_loop FILE RECORD_BYTES RECORDS QUEUE_DEPTH BUFFERS SECONDS PAGES, prints GB/s.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/mman.h>
#include <linux/aio_abi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 8 || (strcmp(argv[7], "4k") && strcmp(argv[7], "huge"))) {
        fprintf(stderr, "usage: aio_loop FILE RECORD_BYTES RECORDS QUEUE_DEPTH BUFFERS SECONDS 4k|huge\n");
        return 2;
    }
    long record = atol(argv[2]), records = atol(argv[3]), buffers = atol(argv[5]);
    int depth = atoi(argv[4]);
    double seconds = atof(argv[6]);
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    aio_context_t ctx = 0;
    size_t huge = 2u << 20, bytes_wanted = (size_t)(record * buffers);
    char *mapped = MAP_FAILED;
    if (fd < 0 || depth < 1 || depth > 256 || buffers < depth || records < 1 ||
        syscall(SYS_io_setup, depth, &ctx) < 0 ||
        (mapped = mmap(NULL, bytes_wanted + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)) ==
            MAP_FAILED) {
        perror("aio_loop");
        return 1;
    }
    char *memory = (char *)(((unsigned long)mapped + huge - 1) & ~(unsigned long)(huge - 1));
    if (!strcmp(argv[7], "huge") && madvise(memory, bytes_wanted, MADV_HUGEPAGE)) {
        perror("madvise");
        return 1;
    }
    memset(memory, 0, bytes_wanted); /* touched, as a cache's slab is */
    struct iocb cbs[256], *ready[256];
    struct io_event events[256];
    long next = 0, bytes = 0;
    for (int i = 0; i < depth; i++) {
        memset(&cbs[i], 0, sizeof cbs[i]);
        cbs[i].aio_data = (unsigned long long)i;
        cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
        cbs[i].aio_fildes = (unsigned)fd;
        cbs[i].aio_nbytes = (unsigned long long)record;
    }
    double start = now();
    int n = depth;
    for (int i = 0; i < depth; i++) ready[i] = &cbs[i];
    while (1) {
        for (int i = 0; i < n; i++) { /* a random record into the next buffer of the window */
            ready[i]->aio_offset = (long long)(random() % records) * record;
            ready[i]->aio_buf = (unsigned long long)(unsigned long)(memory + (next++ % buffers) * record);
        }
        if (syscall(SYS_io_submit, ctx, (long)n, ready) != n) {
            perror("io_submit");
            return 1;
        }
        if (now() - start >= seconds) break;
        n = (int)syscall(SYS_io_getevents, ctx, 1L, (long)depth, events, NULL);
        for (int i = 0; i < n; i++) {
            bytes += (long)events[i].res;
            ready[i] = &cbs[events[i].data];
        }
    }
    printf("%.6f\n", (double)bytes / (now() - start) / 1e9);
    return 0;
}
