"""The iPhone streaming bundle: Core ML programs, raw expert records and a manifest, and its verifier."""

import logging

# coremltools warns at import that it cannot run models on this OS; exporting does not need that.
logging.getLogger("coremltools").setLevel(logging.ERROR)
