# The two commands of the README: `make demo` (install + run the toy demo) and `make test`
# (install + run the test suite). .ci/run calls `make test`.
PYTHON ?= python3
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
export PYTHONFAULTHANDLER ?= 1  # a crash (also at interpreter exit) prints every thread's Python stack

.PHONY: setup demo test test-fast mutation

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) launch.py $(ARGS)

test: setup
	$(PYTHON) -m pytest tests -q --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(PYTHON) -m pytest tests/unit -q $(PYTEST_ARGS)

# Mutation testing (not part of `make test`: ~1 h on 2 cores for every module; MUTANTS="rlhf_ray.data*" narrows it).
# Scores per module: killed or timed-out mutants / mutants run (docs/testing.md). One torch thread per
# mutant: with torch's default threads, forked mutants on a loaded machine hit mutmut's time limit.
MUTANTS ?=
mutation:
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 mutmut run $(MUTANTS); $(PYTHON) scripts/mutation_report.py
