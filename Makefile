# The README's commands, spelled out. `make test` is what CI runs (.ci/run).
CARGO ?= cargo

.PHONY: plugins test build run render bench images

# First-party plugins are a separate cargo workspace built for wasm32-wasip2; the components land
# at target/plugins/<name>.wasm where docs, tests and examples expect them.
plugins:
	bash plugins/build.sh

build: plugins
	$(CARGO) build --workspace

test: plugins
	$(CARGO) test --workspace
	$(CARGO) test --manifest-path plugins/Cargo.toml --target $$(rustc -vV | sed -n 's/host: //p')

# A busybox image built from this machine's busybox (nothing downloaded), for `make run`.
images:
	mkdir -p target/images
	sh examples/images/busybox-archive.sh target/images/busybox.tar keel-examples/busybox:1.35

# The main job: a sample job through `host run` on an embedded cluster started for it, in the
# image `make images` builds.
run: plugins images
	$(CARGO) run -q -p host -- run --config examples/local.toml --images-from target/images examples/hello.yml

render: plugins
	$(CARGO) run -q -p host -- render --config examples/config.toml examples/job.yml

bench: plugins
	$(CARGO) bench -p host
	$(CARGO) bench -p local-cluster
	$(CARGO) build --release -p host --bin host
	python3 host/benches/run_vs_kubectl.py --host target/release/host
	python3 host/benches/strategies.py --host target/release/host
	python3 host/benches/cache_s3.py --host target/release/host
