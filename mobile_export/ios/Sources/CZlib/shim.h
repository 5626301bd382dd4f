// zlib, for the gzip of a join file (`flashmesh cluster add-node`): Debian's zlib1g-dev, the SDK's on Apple platforms.
#include <zlib.h>
