# The two commands a newcomer needs. Each installs what is missing first.
#   make up     start loopchat on the embedded default (http://127.0.0.1:8000)
#   make test   run the whole test suite
#   make scale-demo  replicas, workers, Redis and S3 as separate hosts (deploy/scale-demo.sh)
SHELL := /bin/bash
ARGS ?=
PYTEST_ARGS ?=
.PHONY: up test lint scale-demo

up:
	@venv=$$(deploy/install.sh) && exec "$$venv/bin/loopchat" up $(ARGS)

test:
	@venv=$$(deploy/install.sh --test) && deploy/ensure-redis.sh && \
	  "$$venv/bin/ruff" check . && \
	  "$$venv/bin/python" -m pytest -q $(PYTEST_ARGS)

lint:
	@venv=$$(deploy/install.sh --test) && "$$venv/bin/ruff" check . && "$$venv/bin/ruff" format --check .

scale-demo:
	@venv=$$(deploy/install.sh --test) && LOOPCHAT_PYTHON=$$venv/bin/python deploy/scale-demo.sh $(ARGS)
