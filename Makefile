# gossipfs: the two commands a new user needs are `make run` and `cargo test`.

CARGO ?= cargo
BIN := target/release/gossipfs
CLUSTER_DIR := cluster

.PHONY: build run test check bench cluster cluster-stop clean

## build: compile the release binary
build:
	$(CARGO) build --release

## run: the demo (three nodes in one process; store, get, delete; exits 0)
run: build
	$(BIN) demo

## test: every test
test:
	$(CARGO) test

## check: what CI runs (fmt, clippy -D warnings, tests)
check:
	bash .ci/run

## bench: the benchmark (see the README's Performance section)
bench: build
	$(BIN) bench

## cluster: three `serve` processes on 127.0.0.1:5000-5002, in a chain,
## data and logs under ./cluster; stop them with `make cluster-stop`
cluster: build
	@mkdir -p $(CLUSTER_DIR)
	@for i in 0 1 2; do \
		port=$$((5000 + i)); name=s$$((i + 1)); pidfile=$(CLUSTER_DIR)/$$name.pid; \
		if [ -f $$pidfile ] && kill -0 $$(cat $$pidfile) 2>/dev/null; then \
			echo "$$name already running (pid $$(cat $$pidfile))"; continue; fi; \
		peer=""; [ $$i -gt 0 ] && peer="--peer 127.0.0.1:$$((port - 1))"; \
		$(BIN) serve --listen 127.0.0.1:$$port --root $(CLUSTER_DIR)/$$name --name $$name $$peer \
			2> $(CLUSTER_DIR)/$$name.log & echo $$! > $$pidfile; \
		echo "started $$name on 127.0.0.1:$$port (pid $$(cat $$pidfile), log $(CLUSTER_DIR)/$$name.log)"; \
	done

## cluster-stop: end exactly the processes `make cluster` started
cluster-stop:
	@for pidfile in $(CLUSTER_DIR)/*.pid; do \
		[ -f $$pidfile ] || continue; pid=$$(cat $$pidfile); \
		if kill -0 $$pid 2>/dev/null && ps -p $$pid -o args= | grep -q 'gossipfs serve'; then \
			kill $$pid && echo "stopped $$(basename $$pidfile .pid) (pid $$pid)"; fi; \
		rm -f $$pidfile; \
	done

clean:
	$(CARGO) clean
	rm -rf $(CLUSTER_DIR)
