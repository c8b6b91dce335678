# The two commands of the README:
#   make demo   the whole pipeline on the native stack
#   make test   lint and every test, on the native stack (what CI runs)
.PHONY: bootstrap demo test lint stack-up stack-down

VENV := .venv/bin

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/cdc-consumer stack up
	eval "$$($(VENV)/cdc-consumer stack env)" && $(VENV)/cdc-consumer demo --rate 2000 --duration 60

lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

test: lint
	$(VENV)/pytest -v

stack-up: bootstrap
	$(VENV)/cdc-consumer stack up

stack-down: bootstrap
	$(VENV)/cdc-consumer stack down
