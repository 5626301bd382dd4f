"""The one compiled part: Linux AIO reads for the read queue (node/_aio_reads.c).

Optional: where it does not build (macOS, no C compiler, no xxhash.h), the read queue's Python
reader threads read instead, at a lower record rate (docs/store.md, "Reads").
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
    extensions.append(
        Extension(
            "flashmesh.node._aio_reads",
            sources=["node/_aio_reads.c"],
            libraries=["xxhash"],  # Debian's libxxhash-dev: the same xxh3 as the store's checksums
            extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
