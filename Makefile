# The two commands a newcomer needs: `make demo` and `make test` (both set up .venv first).
.PHONY: setup engine-setup demo test bench clean

setup:
	@scripts/setup.sh

# The side environments the tests also use: vLLM (.venv-engine) and stock transformers 4.57 (.venv-hf4).
engine-setup:
	@scripts/setup_engine.sh
	@scripts/setup_hf4.sh

demo: setup
	.venv/bin/sharegpt4v demo

test: setup engine-setup
	.venv/bin/python -m pytest -q

bench: setup engine-setup
	.venv/bin/python bench/run_all.py

clean:
	rm -rf .venv .venv-engine .venv-hf4 .local
