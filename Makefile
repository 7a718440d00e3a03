# pykata: every target that runs code does `setup` first, so a fresh machine
# needs nothing but `make demo` or `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := python3 crun runc busybox-static util-linux mount hostname golang-go golang-github-containerd-ttrpc-dev \
                golang-google-protobuf-dev protobuf-compiler libprotobuf-dev protoc-gen-go gogottrpc iproute2 \
                iptables xfsprogs e2fsprogs lttng-tools liblttng-ust1 python3-lttngust \
                babeltrace2 python3-bt2
# The guest VM's: without recommends (QEMU's would bring a GTK desktop).
VM_DEB_PACKAGES := qemu-system-x86 debootstrap cpio zstd
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo demo-vm test test-fast bench protos lint clean clean-traces guest-image clean-guest guest-snapshot

setup: $(STAMP)

# missing LIST: the packages of LIST not installed yet.
missing = $$(for p in $(1); do \
    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done)

$(STAMP): pyproject.toml Makefile
	@set -e; missing="$(call missing,$(DEB_PACKAGES))"; vm_missing="$(call missing,$(VM_DEB_PACKAGES))"; \
	if [ -n "$$missing$$vm_missing" ]; then \
	    echo "setup: installing Debian packages:" $$missing $$vm_missing; \
	    apt-get update -qq; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    if [ -n "$$missing" ]; then apt-get install -y -qq $$missing >/dev/null; fi; \
	    if [ -n "$$vm_missing" ]; then \
	        apt-get install -y -qq --no-install-recommends $$vm_missing >/dev/null; fi; \
	fi
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,fast]'
	@touch $(STAMP)

# Regenerate the protobuf modules from protos/. The sed turns protoc's
# top-level imports into package-relative ones so pykata.api is self-contained.
protos: setup
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=src/pykata/api --pyi_out=src/pykata/api \
	    protos/oci.proto protos/csi.proto protos/types.proto protos/agent.proto protos/health.proto \
	    protos/extensions.proto
	sed -i -E 's/^import (oci|csi|types|agent|health|extensions)_pb2 as/from . import \1_pb2 as/' src/pykata/api/*_pb2.py
	sed -i -E 's/^import (oci|csi|types|agent|health|extensions)_pb2 as/from . import \1_pb2 as/; s/^from (oci|csi|types|agent|health|extensions)_pb2 import/from .\1_pb2 import/' src/pykata/api/*_pb2.pyi
	$(PY) -m grpc_tools.protoc -Iprotos -I$$($(PY) -c 'import grpc_tools, os; print(os.path.dirname(grpc_tools.__file__))')/_proto \
	    -I$$($(PY) -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(google.rpc.__path__[0])))') \
	    --python_out=src/pykata/ttrpc --pyi_out=src/pykata/ttrpc protos/ttrpc.proto

lint: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy

# The guest VM's image (kernel, initramfs, root disk with the agent, and the initrd
# for the real Kata runtime), cached in GUEST_DIR and rebuilt only when its inputs
# change (docs/vm.md, docs/kata-runtime.md).
GUEST_DIR ?= $(HOME)/.cache/pykata/guest
guest-image: setup
	PYKATA_GUEST_DIR=$(GUEST_DIR) $(VENV)/bin/kata-guest-image --kata-initrd

clean-guest:
	rm -rf -- $(GUEST_DIR)

# A booted guest saved once (remade when the image or options change), for
# `connect --vm qemu --from-snapshot $(GUEST_SNAPSHOT)`: docs/vm.md, Snapshots.
GUEST_SNAPSHOT ?= $(GUEST_DIR)/snapshot
guest-snapshot: guest-image
	PYKATA_GUEST_DIR=$(GUEST_DIR) $(VENV)/bin/kata-agent-ctl vm --snapshot $(GUEST_SNAPSHOT)

# The agent as a VM's init: boot the guest, ask it about itself, run a container, power off.
demo-vm: setup guest-image
	PYKATA_GUEST_DIR=$(GUEST_DIR) $(VENV)/bin/kata-agent-ctl connect --vm qemu \
	    -c Check -c GetGuestDetails -c "run /bin/sh -c 'uname -a; cat /proc/cpuinfo | grep -m1 \"model name\"'"

test: setup lint guest-image
	PYKATA_GUEST_DIR=$(GUEST_DIR) $(VENV)/bin/pytest -q

# The fast tier: lint, types and every test that needs no VM, no Go peer and no LTTng,
# and is not a load test (a gigabyte moved, thousands of processes).
FAST_TESTS := not vm and not go and not lttng and not load
test-fast: setup lint
	$(VENV)/bin/pytest -q -n 4 -m "$(FAST_TESTS)"

demo: setup
	$(PY) scripts/demo.py

bench: setup guest-image
	PYKATA_GUEST_DIR=$(GUEST_DIR) $(PY) bench/run.py --output BENCHMARKS.md

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# Traces recorded by kata-container-trace (and nothing else).
TRACES_DIR ?= lttng-traces
clean-traces:
	rm -rf -- $(TRACES_DIR)
