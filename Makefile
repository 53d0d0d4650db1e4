# Entry points. Each target bootstraps what it needs (uv, the locked env, system packages).
.PHONY: bootstrap demo test lint types unit bench protos images compose clean

# scripts/bootstrap.sh prints the uv to use, or nothing when it failed: then stop here
# rather than run the recipe with an empty command.
UV = $(or $(shell scripts/bootstrap.sh),$(error scripts/bootstrap.sh failed (its message is above); nothing was run))
UV_TEST = $(or $(shell scripts/bootstrap.sh test),$(error scripts/bootstrap.sh test failed (its message is above); nothing was run))

bootstrap:
	@scripts/bootstrap.sh >/dev/null

## make demo: the main job (see README)
demo:
	$(UV) run --locked dna-testnet demo

## make test: lint, types and the whole pytest suite
test:
	$(MAKE) --no-print-directory lint types unit UV=$(UV_TEST)

lint:
	$(UV) run --locked ruff check .
	$(UV) run --locked ruff format --check .

types:
	$(UV) run --locked mypy libs/core/src services tools bench scripts tests

unit:
	$(UV) run --locked pytest

## make bench: every benchmark (JSON lines, see shared BENCH.md)
bench:
	$(UV) run --locked python -m bench

protos:
	$(UV) run --locked python scripts/gen_protos.py

## make images: the container images dna-<role>:local (deploy/docker, docs/operations.md)
images:
	@scripts/bootstrap.sh images >/dev/null
	scripts/images.sh

## make compose: regenerate docker-compose.yml and deploy/compose/ from the testnet topology
compose:
	$(UV) run --locked python scripts/gen_compose.py

clean:
	rm -rf .venv .tools .mypy_cache .ruff_cache .pytest_cache .hypothesis
