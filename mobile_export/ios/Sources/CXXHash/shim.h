#define XXH_INLINE_ALL
#include <xxhash.h>

// XXH_INLINE_ALL renames xxhash's functions by macro, which Swift does not see: one plain wrapper.
static inline unsigned long long fm_xxh3_64(const void *data, size_t length) { return XXH3_64bits(data, length); }
