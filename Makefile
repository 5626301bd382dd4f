PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The Swift node (mobile_export/ios): built and tested by pytest (tests/test_swift_*.py) when a Swift
# toolchain is here; the C libraries it links come from Debian's packages, installed when missing.
SWIFT ?= $(shell command -v swift || ls /opt/swift/usr/bin/swift 2>/dev/null)
SWIFT_DEBS := libgrpc-dev libxxhash-dev libopenblas-dev zlib1g-dev

.PHONY: demo test lint format clean swift-deps ios-app

# node/_aio_reads.c (Linux AIO reads) links Debian's libxxhash; pip builds it when the header is
# here, and the store reads with Python threads where it is not (setup.py).
$(STAMP): pyproject.toml setup.py node/_aio_reads.c
	@if [ "$$(uname)" = Linux ] && command -v dpkg >/dev/null && ! dpkg -s libxxhash-dev >/dev/null 2>&1 \
		&& [ "$$(id -u)" = 0 ]; then echo "installing libxxhash-dev for the AIO reader"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libxxhash-dev >/dev/null; fi
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flashmesh demo

test: $(STAMP) swift-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

swift-deps:
ifeq ($(SWIFT),)
	@echo "################################################################################"
	@echo "## SKIPPED: no Swift toolchain (swift): the Swift node is neither built nor tested"
	@echo "################################################################################"
	@if [ -n "$$FLASHMESH_REQUIRE_SWIFT" ] && [ "$$FLASHMESH_REQUIRE_SWIFT" != 0 ]; then \
		echo "FLASHMESH_REQUIRE_SWIFT is set: a missing Swift toolchain is an error"; exit 1; fi
else
	@if ! command -v dpkg >/dev/null; then \
		echo "not Debian: the Swift node links gRPC, xxhash and BLAS from the system (docs/ios.md)"; exit 0; fi; \
	missing=$$(for p in $(SWIFT_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing $$missing for the Swift node"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
endif

# The iOS app (macOS with Xcode only): `brew install xcodegen xxhash && make ios-app` (docs/ios.md).
ios-app:
	cd mobile_export/ios/App && xcodegen generate && open FlashmeshNode.xcodeproj

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .flashmesh mobile_export/ios/.build build node/_aio_reads*.so
