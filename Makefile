# The two commands of the README:
#   make demo   the whole pipeline on the native stack
#   make test   lint and every test, on the native stack (what CI runs); then the tests marked
#               `secure` again on a secured stack of their own (TLS and passwords everywhere)
.PHONY: bootstrap demo test test-secure lint stack-up stack-down

VENV := .venv/bin

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/cdc-consumer stack up
	eval "$$($(VENV)/cdc-consumer stack env)" && $(VENV)/cdc-consumer demo --rate 2000 --duration 60

lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

# The secured run keeps its own state directory and ports (so a plain stack left running does not
# stand in its way) and shares the plain stack's downloads.
SECURE_STACK := CDC_STACK_SECURE=1 \
	CDC_STACK_LIB="$${CDC_STACK_LIB:-$$(realpath -m $${CDC_STACK_DIR:-.stack})/lib}" \
	CDC_STACK_DIR="$${CDC_STACK_DIR:-.stack}-secure" \
	CDC_STACK_PORT_OFFSET=$$(( $${CDC_STACK_PORT_OFFSET:-0} + 50 ))

test: lint
	$(VENV)/pytest -v
	$(SECURE_STACK) $(VENV)/pytest -v -m secure

test-secure: bootstrap
	$(SECURE_STACK) $(VENV)/pytest -v -m secure

stack-up: bootstrap
	$(VENV)/cdc-consumer stack up

stack-down: bootstrap
	$(VENV)/cdc-consumer stack down
