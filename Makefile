# DermaSeg tasks. `make help` lists them. Everything runs in .venv (created on first use).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help serve test test-fast lint openapi bench load reproduce release-previous release-train release-export release-eval release-report calibrate-quality report loso loso-compare smoke clean

help: ## list the tasks
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/.serve-deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.dev-deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[train,dev]"
	touch $(BIN)/.serve-deps $@

serve: $(BIN)/.serve-deps ## serve the shipped model on http://$(HOST):$(PORT) (the viewer page at /)
	@echo "DermaSeg: open http://$(HOST):$(PORT)/ for the viewer page (POST /segment for the API)"
	$(BIN)/dermaseg serve --host $(HOST) --port $(PORT)

test: $(BIN)/.dev-deps ## run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(BIN)/.dev-deps ## run the quick tests (no training, export or load run)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(BIN)/.dev-deps ## ruff (lint and format), mypy --strict on the service, hadolint
	$(BIN)/ruff check training service tests bench
	$(BIN)/ruff format --check training service tests bench
	$(BIN)/mypy --strict service
	$(BIN)/hadolint Dockerfile

openapi: $(BIN)/.dev-deps ## regenerate openapi/openapi.json from the app
	$(BIN)/python -m service.openapi

# The comparisons docs/performance.md shows: session threads and spinning; the service as shipped (intra-op
# threads = CPUs / max_concurrency), with ONNX Runtime's own thread count, answering with the mask alone, and
# (issue 13) the 6 MP and 12 MP samples at concurrency 1. Release 1.0.0's code is timed beside the served
# code in the pipeline section; the decode check (section 8) runs too. About 11–12 minutes on the 2-CPU box.
SAMPLES ?= ../shared/data/samples/images
BENCH_OPTS ?= --threads 0,1 --spinning default,off --service defaults: \
  --service ort-threads:intra_op_threads=0 \
  --service mask-only:query=outputs=mask \
  --service 6mp:photo=$(SAMPLES)/ISIC_0012099.jpg,concurrency=1,requests=40 \
  --service 12mp:photo=$(SAMPLES)/ISIC_0012383.jpg,concurrency=1,requests=30

load: $(BIN)/.dev-deps ## the load run: 2,000 good and bad requests at concurrency 16, then a burst (runs/load.json)
	$(BIN)/python -m tests.load_run --out runs/load.json $(LOAD_OPTS)

bench: $(BIN)/.dev-deps ## run the performance benchmark, writes docs/performance.md (on a quiet machine)
	$(BIN)/python -m bench $(BENCH_OPTS) $(BENCH_EXTRA)

# The paper's comparison: three models trained on PH2, tested on ISIC 2017 training images (external).
DATA ?= ../shared/data
REPRO_EPOCHS ?= 50
REPRO_SIZE ?= 224
REPRO_OPTS ?= --encoder-weights none --precision mixed_bfloat16
REPRO = $(BIN)/dermaseg train --data $(DATA)/ph2 --epochs $(REPRO_EPOCHS) --image-size $(REPRO_SIZE) $(REPRO_OPTS)
reproduce: $(BIN)/.dev-deps ## train and evaluate the paper's three models into runs/repro-*
	$(REPRO) --out runs/repro-baseline --arch unet --loss bce
	$(REPRO) --out runs/repro-focal-noaug --loss focal --no-augment
	$(REPRO) --out runs/repro-focal-aug --loss focal
	for run in baseline focal-noaug focal-aug; do \
	  $(BIN)/dermaseg evaluate --model runs/repro-$$run/best.keras --split runs/repro-$$run/split.json \
	    --data $(DATA)/ph2 --out runs/repro-$$run/eval_val.json && \
	  $(BIN)/dermaseg evaluate --model runs/repro-$$run/best.keras --data $(DATA)/isic2017_train \
	    --out runs/repro-$$run/eval_external.json || exit 1; \
	done

# Release 2.0.0 (issue 12): release 1.0.0's weights, read back out of its ONNX file in git (`dermaseg recover`),
# fine-tuned on all three sources with the recipe the leave-one-source-out check chose (docs/results.md).
# 1.0.0's validation photos stay in validation (--split-like its card); HAMs are split grouped by lesion.
# Rerunning resumes an interrupted run. About 75 minutes on the 2-CPU box.
V1_COMMIT ?= adc9ade
V1_DIR ?= runs/v1.0.0
RELEASE_RUN ?= runs/release-2.0.0
RELEASE_DATA = --data $(DATA)/ph2 --data $(DATA)/isic2017_train --data $(DATA)/ham10000
RELEASE_OPTS ?= --encoder-weights none --decoder-filters 256 128 64 32 16 --image-size 192 \
  --precision mixed_bfloat16 --loss focal \
  --learning-rate 1e-4 --schedule cosine --epochs 6 --steps-per-epoch 150 --val-fraction 0.1 --seed 42
release-previous: $(BIN)/.dev-deps ## release 1.0.0 from git into runs/v1.0.0: its ONNX file, card and recovered checkpoint
	mkdir -p $(V1_DIR)
	git show $(V1_COMMIT):models/dermaseg.onnx > $(V1_DIR)/dermaseg.onnx
	git show $(V1_COMMIT):models/dermaseg.json > $(V1_DIR)/dermaseg.json
	test -f $(V1_DIR)/recover.json || $(BIN)/dermaseg recover --model $(V1_DIR)/dermaseg.onnx \
	  --card $(V1_DIR)/dermaseg.json --data $(DATA)/ph2 --data $(DATA)/isic2017_train \
	  --out $(V1_DIR)/recovered.keras > $(V1_DIR)/recover.json

release-train: release-previous ## train the release model into runs/release-2.0.0 (resumes), warm-started from 1.0.0
	if [ -f $(RELEASE_RUN)/config.json ]; then \
	  $(BIN)/dermaseg train --resume $(RELEASE_RUN); \
	else \
	  $(BIN)/dermaseg train $(RELEASE_DATA) --out $(RELEASE_RUN) --init-from $(V1_DIR)/recovered.keras \
	    --split-like $(V1_DIR)/dermaseg.json $(RELEASE_OPTS); \
	fi

RELEASE_VERSION ?= 2.0.0
RELEASE_THRESHOLD ?= 0.5
release-export: $(BIN)/.dev-deps ## export runs/release-2.0.0/best.keras to models/dermaseg.onnx (float16) and its card
	$(BIN)/dermaseg export --checkpoint $(RELEASE_RUN)/best.keras --out models/dermaseg.onnx --name dermaseg \
	  --version $(RELEASE_VERSION) --threshold $(RELEASE_THRESHOLD) --variants float16 int8 --ship float16 \
	  --calibration-data $(DATA)/ph2 --calibration-data $(DATA)/isic2017_train --calibration-data $(DATA)/ham10000

# The shipped model on its validation split (every source; each post-processing; thresholds 0.3–0.6), release
# 1.0.0 on the same photos (none of which it trained on), and the sample photos at their original size.
RELEASE_EVAL = $(BIN)/dermaseg evaluate --model models/dermaseg.onnx --card models/dermaseg.json $(RELEASE_DATA) \
  --split $(RELEASE_RUN)/split.json
release-eval: $(BIN)/.dev-deps ## score the shipped model and 1.0.0 on the release run's validation split, and samples/
	$(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_plain.json
	$(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_tta.json --flip-tta
	$(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_lc.json --largest-component
	$(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_fh.json --fill-holes
	$(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_all.json --flip-tta --largest-component --fill-holes
	for t in 0.3 0.4 0.5 0.6; do \
	  $(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_t$$t.json --threshold $$t --label threshold_$$t || exit 1; \
	done
	$(BIN)/dermaseg evaluate --model $(V1_DIR)/dermaseg.onnx $(RELEASE_DATA) --split $(RELEASE_RUN)/split.json \
	  --out $(RELEASE_RUN)/v1_val_plain.json
	$(BIN)/dermaseg evaluate --model models/dermaseg.onnx --card models/dermaseg.json --data $(DATA)/samples \
	  --out $(RELEASE_RUN)/eval_samples.json --overlays $(RELEASE_RUN)/overlays_samples

calibrate-quality: $(BIN)/.dev-deps ## fit models/dermaseg.quality.json on unseen photos; docs/quality-calibration.json and docs/quality.md
	nice -n 10 $(BIN)/python -m training.cli calibrate-quality --model models/dermaseg.onnx --card models/dermaseg.json \
	  --data $(DATA)/ham10000 --data $(DATA)/isic2017_train --data $(DATA)/ph2 --max-per-source 3000 --seed 14 \
	  --flip-agreement --rows runs/quality/rows.csv --out models/dermaseg.quality.json \
	  --report docs/quality-calibration.json
	$(BIN)/python -m training.quality_report

report: $(BIN)/.dev-deps ## write docs/results.md from the run directories in runs/ (the reproduction's and releases')
	$(BIN)/python -m training.report
	$(BIN)/python -m training.release_report

release-report: $(BIN)/.dev-deps ## rewrite the release 2.0.0 section of docs/results.md and the card's recipe evidence
	$(BIN)/python -m training.release_report --write-card

# Leave-one-source-out ranking of recipe options (issue 12): train on PH2 + HAM10000 without the ISIC 2017
# training images, small and short, then score on those. `make loso NAME=base`, then e.g.
# `make loso NAME=jaccard RECIPE="--loss focal+jaccard"` and `make loso-compare A=base B=jaccard`.
# Rerunning `make loso NAME=...` resumes an interrupted run (--resume) before scoring it. Never add
# --init-from runs/release/best.keras here: release 1.0.0 was trained on isic2017_train.
NAME ?= base
RECIPE ?=
LOSO_SIZE ?= 128
LOSO_EPOCHS ?= 8
LOSO_STEPS ?= 60
# Release 1.0.0's network and schedule (its card), small and short; RECIPE's options come after and win.
LOSO_OPTS ?= --encoder-weights none --decoder-filters 256 128 64 32 16 --precision mixed_bfloat16 \
  --learning-rate 5e-4 --lr-patience 3 --early-stopping-patience 8 --val-fraction 0.1
LOSO_HELD_OUT ?= $(DATA)/isic2017_train
LOSO_RUN = runs/loso-$(NAME)
loso: $(BIN)/.dev-deps ## leave-one-source-out: train RECIPE="..." on PH2 + HAM10000 into runs/loso-NAME, score on ISIC 2017
	if [ -f $(LOSO_RUN)/config.json ]; then \
	  $(BIN)/dermaseg train --resume $(LOSO_RUN) --epochs $(LOSO_EPOCHS); \
	else \
	  $(BIN)/dermaseg train --data $(DATA)/ph2 --data $(DATA)/ham10000 --out $(LOSO_RUN) \
	    --image-size $(LOSO_SIZE) --epochs $(LOSO_EPOCHS) --steps-per-epoch $(LOSO_STEPS) $(LOSO_OPTS) $(RECIPE); \
	fi
	$(BIN)/dermaseg evaluate --model $(LOSO_RUN)/best.keras --data $(LOSO_HELD_OUT) \
	  --out $(LOSO_RUN)/eval_held_out.json

A ?= base
B ?= $(NAME)
loso-compare: $(BIN)/.dev-deps ## paired comparison of two leave-one-source-out runs: A=NAME B=NAME
	$(BIN)/python -m training.compare runs/loso-$(A)/eval_held_out.json runs/loso-$(B)/eval_held_out.json

SMOKE_PHOTO ?= $(DATA)/samples/images/ISIC_0009995.jpg

# The probes: ready; the viewer page served; a real photo segmented (JSON and PNG); a text file refused with
# 400; the docs pages off; metrics; the process runs as uid 10001, not root; nothing in the container's /tmp
# (no telemetry file).
SMOKE_CONTAINER = $$(podman ps -q --filter ancestor=localhost/container-smoke:latest | head -n 1)
smoke: ## build the container and probe it (needs ../shared/tools/container-smoke)
	../shared/tools/container-smoke -- 'curl -fsS $$URL/health/ready' \
	  'curl -fsS $$URL/ | grep -q "<canvas id=\"overlay\""' \
	  'curl -fsS -F file=@$(SMOKE_PHOTO) "$$URL/segment?outputs=" | grep -q "\"found\":true"' \
	  'curl -fsS -F file=@$(SMOKE_PHOTO) -H "Accept: image/png" $$URL/segment | head -c 8 | grep -q PNG' \
	  'test "$$(curl -s -o /dev/null -w "%{http_code}" -F file=@README.md $$URL/segment)" = 400' \
	  'test "$$(curl -s -o /dev/null -w "%{http_code}" $$URL/docs)" = 404' \
	  'curl -fsS $$URL/metrics | grep -q dermaseg_' \
	  'test "$$(podman exec $(SMOKE_CONTAINER) id -u)" = 10001' \
	  'test -z "$$(podman exec $(SMOKE_CONTAINER) ls -A /tmp)"'

clean: ## remove caches (not the venv, not runs/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
