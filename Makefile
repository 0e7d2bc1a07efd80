# customer-sync: the commands a developer and CI use. Everything installs what it needs itself.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
INFRA := deploy/local/infra.sh
WITH_ENV := . .run/env &&
ROWS ?= 20000
# Cargo tools the lint needs, built once per machine (not per clone) at a pinned version.
TOOLS := $(HOME)/.cache/customer-sync/tools
MACHETE_VERSION := 0.9.2
DENY_VERSION := 0.20.2

.PHONY: all infra test-infra down build release test test-cluster lint audit fmt demo bench soak compose-test clean

all: build

## Private NATS and PostgreSQL (or NATS_URL / DATABASE_URL when set); see deploy/local/infra.sh.
infra:
	@$(INFRA) up

## The same, plus the nats-server and PostgreSQL binaries the tests that restart servers start.
test-infra:
	@$(INFRA) up --for-tests

down:
	@$(INFRA) down

build:
	cargo build --workspace --all-targets

## Only the shipped binaries; the benchmark tools (libs/bench-tools) are built by
## the bench scripts, with the same feature set (--workspace), so nothing is rebuilt twice.
release:
	cargo build --workspace --release --bin csv-reader --bin crm-integrator --bin persister --bin crm-mock --bin syncctl

fmt:
	cargo fmt --all

## fmt, clippy (with clippy.toml's bans) and unused dependencies.
lint: $(TOOLS)/bin/cargo-machete
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(TOOLS)/bin/cargo-machete

## Licences, bans and sources by deny.toml; advisories too when RustSec's database (on GitHub) can be
## fetched. Not part of `make test`: cargo-deny takes minutes to build and CI cannot reach GitHub.
audit: $(TOOLS)/bin/cargo-deny
	$(TOOLS)/bin/cargo-deny check licenses bans sources
	@if $(TOOLS)/bin/cargo-deny fetch db >/dev/null 2>&1; then \
	  $(TOOLS)/bin/cargo-deny check --disable-fetch advisories; \
	else \
	  echo "advisories NOT checked: the RustSec database (github.com/RustSec/advisory-db) cannot be fetched from here"; \
	fi

$(TOOLS)/bin/cargo-deny:
	cargo install --locked --quiet --root $(TOOLS) cargo-deny@$(DENY_VERSION)

$(TOOLS)/bin/cargo-machete:
	cargo install --locked --quiet --root $(TOOLS) cargo-machete@$(MACHETE_VERSION)

## The binaries are built first: the end-to-end tests run them as separate processes.
test: test-infra lint
	cargo build --workspace --bins
	$(WITH_ENV) cargo test --workspace --no-fail-fast

## Only the 3-node cluster tests (libs/e2e/tests/cluster.rs; make test runs them too).
test-cluster: test-infra
	cargo build --workspace --bins
	$(WITH_ENV) cargo test -p e2e --test cluster

demo: infra release
	$(WITH_ENV) ROWS=$(ROWS) deploy/local/demo.sh

bench: infra release
	$(WITH_ENV) deploy/local/bench.sh

soak: infra release
	$(WITH_ENV) ROWS=1000000 deploy/local/soak.sh

## The compose stack under podman (optional, not in CI): deploy/podman/compose-test.sh.
compose-test:
	deploy/podman/compose-test.sh

clean:
	@$(INFRA) clean
	cargo clean
	rm -rf .run
