# Entry points. Each target bootstraps what it needs (uv, the locked env, system packages).
.PHONY: bootstrap demo test check lint types unit fast bench protos config-docs metrics-docs dashboards chart-schema images compose resilience chaos-scenarios clean

# scripts/bootstrap.sh prints the uv to use, or nothing when it failed: then stop here
# rather than run the recipe with an empty command.
UV = $(or $(shell scripts/bootstrap.sh),$(error scripts/bootstrap.sh failed (its message is above); nothing was run))
UV_TEST = $(or $(shell scripts/bootstrap.sh test),$(error scripts/bootstrap.sh test failed (its message is above); nothing was run))

bootstrap:
	@scripts/bootstrap.sh >/dev/null

## make demo: the main job (see README)
demo:
	$(UV) run --locked dna-testnet demo

## make test: lint, types and the whole pytest suite (with the chart, alert rules and
## dashboards in tests/deploy: `scripts/bootstrap.sh test` installs helm and promtool)
test:
	$(MAKE) --no-print-directory lint types unit UV=$(UV_TEST)

## make check: the fast inner loop: lint, types and the tests that start no process
check:
	$(MAKE) --no-print-directory lint types fast UV=$(UV)

lint:
	$(UV) run --locked ruff check .
	$(UV) run --locked ruff format --check .

types:
	$(UV) run --locked mypy libs/core/src services tools bench scripts tests

unit:
	$(UV) run --locked pytest

# Unit, property and in-process tests: every test not marked `process` (tests/process_mark.py
# keeps the mark true: a test that starts a process unmarked fails).
fast:
	$(UV) run --locked pytest -q -m "not process and not slow"

## make bench: every benchmark (JSON lines, see shared BENCH.md)
bench:
	$(UV) run --locked python -m bench

protos:
	$(UV) run --locked python scripts/gen_protos.py

## make config-docs: docs/configuration.md and deploy/config-schema/*.json from the config models
## (a test in `make test` fails while the committed ones are not current)
config-docs:
	$(UV) run --locked python scripts/gen_config_docs.py

## make metrics-docs: the metrics reference in docs/operations.md from the roles' registries
## (a test in `make test` fails while the committed one is not current)
metrics-docs:
	$(UV) run --locked python scripts/gen_metrics_docs.py

## make dashboards: regenerate deploy/grafana/dashboards/*.json from scripts/gen_dashboards.py
dashboards:
	$(UV) run --locked python scripts/gen_dashboards.py

## make chart-schema: regenerate deploy/helm/dna/values.schema.json from the config models
chart-schema:
	$(UV) run --locked python scripts/gen_chart_schema.py

## make images: the container images dna-<role>:local (deploy/docker, docs/operations.md)
images:
	@scripts/bootstrap.sh images >/dev/null
	scripts/images.sh

## make compose: regenerate docker-compose.yml and deploy/compose/ from the testnet topology
compose:
	$(UV) run --locked python scripts/gen_compose.py

## make resilience: the six resilience scenarios on the compose testnet, each with its seed
## and figures (docs/resilience.md); fails if any message was lost or duplicated.
## RESILIENCE_ARGS passes options, e.g. RESILIENCE_ARGS="--scenario churn --seed 7"
resilience:
	@scripts/bootstrap.sh images >/dev/null
	scripts/images.sh
	$(UV) run --locked dna-testnet resilience $(RESILIENCE_ARGS)

## make chaos-scenarios: regenerate deploy/chaos/scenarios.yaml from the resilience scenarios
chaos-scenarios:
	$(UV) run --locked python scripts/gen_chaos_scenarios.py

clean:
	rm -rf .venv .tools .mypy_cache .ruff_cache .pytest_cache .hypothesis
