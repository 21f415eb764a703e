# The two commands a newcomer needs: `make demo` and `make test` (both set up .venv first).
.PHONY: setup demo test bench clean

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/sharegpt4v demo

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/run_all.py

clean:
	rm -rf .venv .local
