# DermaSeg tasks. `make help` lists them. Everything runs in .venv (created on first use).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help serve test test-fast lint openapi bench model-cost load reproduce release-previous release-train release-export release-score release-eval release-ship release-report calibrate-quality report loso loso-compare smoke clean

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

model-cost: $(BIN)/.dev-deps ## the served pipeline of release RELEASE's candidate against the shipped model's, side by side (quiet machine)
	$(BIN)/python -m bench.model_cost models/dermaseg.onnx $(RELEASE_MODEL)/dermaseg.onnx $(MODEL_COST_OPTS)

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

# Releases (issue 12). Each release fine-tunes the one before it: the previous release's ONNX file and card
# come out of git and `dermaseg recover` reads its weights back into a trainable checkpoint (no checkpoint is
# kept). The previous release's validation photos stay in validation (--split-like its card), so the two are
# compared on photos neither trained on. `make release-train RELEASE=2.0.0` reproduces 2.0.0; the default is
# the newest. Rerunning release-train resumes an interrupted run. The candidate is exported into its run
# directory and evaluated there; `make release-ship` copies it to models/ (then run calibrate-quality).
RELEASE ?= 2.7.0
SOURCES = ph2 isic2017_train ham10000
RELEASE_DATA = $(foreach source,$(SOURCES),--data $(DATA)/$(source))
RELEASE_BASE_OPTS = --encoder-weights none --decoder-filters 256 128 64 32 16 --image-size 192 \
  --precision mixed_bfloat16 --loss focal --schedule cosine --epochs 6 --steps-per-epoch 150 --val-fraction 0.1
# 2.0.0: 1.0.0 fine-tuned on all three sources, each photo once per pass (about 75 minutes on the 2-CPU box).
PREVIOUS.2.0.0 = 1.0.0
PREVIOUS_COMMIT.2.0.0 = adc9ade
PREVIOUS_DATA.2.0.0 = --data $(DATA)/ph2 --data $(DATA)/isic2017_train
RELEASE_OPTS.2.0.0 = $(RELEASE_BASE_OPTS) --learning-rate 1e-4 --seed 42
RELEASE_REPORT_OPTS.2.0.0 = --loso base runs/loso-base --loso bundle runs/loso-bundle --loso jaccard runs/loso-jaccard \
  --write-card
# 2.1.0: 2.0.0 fine-tuned with ISIC 2017 taking 60 % of every epoch, half the learning rate, and an
# exponential moving average of the weights: 6 × 150 steps in mixed_bfloat16 (the CPU it was trained on has
# AVX-512 BF16: `python -m bench.train_precision` measured 6.9 images/s against 5.3 in float32 there).
PREVIOUS.2.1.0 = 2.0.0
PREVIOUS_COMMIT.2.1.0 = 0012efe
PREVIOUS_DATA.2.1.0 = $(RELEASE_DATA)
RELEASE_OPTS.2.1.0 = $(RELEASE_BASE_OPTS) \
  --learning-rate 5e-5 --ema --source-weights isic2017_train=0.6,ham10000=0.3,ph2=0.1 --seed 43
# Set before its run: 2.1.0 is shipped only if it beats 2.0.0 on ISIC 2017 (95 % interval above 0) and loses
# at most 0.005 Jaccard pooled, on 2.0.0's validation photos.
# Outcome (make release-report RELEASE=2.1.0): ISIC 2017 +0.008 [-0.000, +0.017], pooled -0.001: not shipped.
# The rule since 2.1.0, set before each run (checked by release_report --rule):
ISIC_RULE = --rule isic2017_train:0.005 --write-card
RELEASE_REPORT_OPTS.2.1.0 = $(ISIC_RULE)
# 2.2.0: 2.1.0's recipe with one change, the loss: focal plus a per-image soft Jaccard term (weight 1). With
# HAM10000 held out (a proxy that under-segments, as the external set does) the term gained +0.007 Jaccard
# [+0.004, +0.010] (runs/rule-loso-ham.txt set that test before its runs). Same seed as 2.1.0, so the two
# differ in the loss alone.
PREVIOUS.2.2.0 = 2.0.0
PREVIOUS_COMMIT.2.2.0 = 0012efe
PREVIOUS_DATA.2.2.0 = $(RELEASE_DATA)
RELEASE_OPTS.2.2.0 = $(RELEASE_OPTS.2.1.0) --loss focal+jaccard
# Set before its run, the same rule as 2.1.0's: shipped only if it beats 2.0.0 on ISIC 2017 (95 % interval
# above 0) and loses at most 0.005 Jaccard pooled, on 2.0.0's validation photos.
# Outcome (make release-report RELEASE=2.2.0): ISIC 2017 -0.014 [-0.027, -0.001], pooled -0.009: not shipped.
RELEASE_REPORT_OPTS.2.2.0 = $(ISIC_RULE) \
  --loso ham-base runs/loso-ham-base --loso ham-jaccard runs/loso-ham-jaccard
# 2.3.0: 2.1.0's recipe (focal; ISIC 2017 60 % of each epoch) run twice as long, 12 × 150 steps, and the
# last epoch's weights exported rather than those of the lowest validation loss. Why: 2.1.0's training Jaccard
# was still rising at its end, and its lowest validation loss came at epoch 2 of 6 (focal loss follows the
# Jaccard loosely); its last epoch's weights, scored after the fact, did better on ISIC 2017 (0.821 against
# 0.817). Taking the last epoch also keeps the comparison set out of the choice of weights.
PREVIOUS.2.3.0 = 2.0.0
PREVIOUS_COMMIT.2.3.0 = 0012efe
PREVIOUS_DATA.2.3.0 = $(RELEASE_DATA)
RELEASE_OPTS.2.3.0 = $(RELEASE_OPTS.2.1.0) --epochs 12 --seed 44
RELEASE_CHECKPOINT.2.3.0 = last
# Set before its run, the same rule as 2.1.0's: shipped only if it beats 2.0.0 on ISIC 2017 (95 % interval
# above 0) and loses at most 0.005 Jaccard pooled, on 2.0.0's validation photos.
# Outcome (make release-report RELEASE=2.3.0): ISIC 2017 +0.014 [+0.005, +0.022], pooled -0.001: the rule is met,
# so 2.3.0 is shipped (make release-eval release-ship calibrate-quality release-report RELEASE=2.3.0).
RELEASE_REPORT_OPTS.2.3.0 = $(ISIC_RULE)
# 2.4.0: 2.3.0's recipe at 256² instead of 192² (the ISIC 2017 photos here are 256 px, the external set's far
# larger), warm-started from 2.3.0 (the network is fully convolutional), 6 × 150 steps, the last epoch's
# weights. Input size is the one option issue 12 names that no run had measured. It costs (256/192)² = 1.78×
# the network's arithmetic per photo; `make bench` measures what that is end to end.
PREVIOUS.2.4.0 = 2.3.0
PREVIOUS_COMMIT.2.4.0 = 4dcd57f
PREVIOUS_DATA.2.4.0 = $(RELEASE_DATA)
RELEASE_OPTS.2.4.0 = $(subst --image-size 192,--image-size 256,$(RELEASE_OPTS.2.1.0)) --seed 45
RELEASE_CHECKPOINT.2.4.0 = last
# Set before its run: shipped only if it beats 2.3.0 on ISIC 2017 (95 % interval above 0) and loses at most
# 0.005 Jaccard pooled, on the same validation photos (2.0.0's, which 2.3.0 kept).
# Outcome (make release-report RELEASE=2.4.0): ISIC 2017 -0.007 [-0.018, +0.003], pooled -0.000, failures
# 85 -> 99: not shipped. `make model-cost RELEASE=2.4.0` measured 1.24-1.44x the served pipeline's time.
RELEASE_REPORT_OPTS.2.4.0 = $(ISIC_RULE)
# 2.5.0: 2.3.0's recipe (192²) with ISIC 2017 taking 80 % of every epoch instead of 60 % (HAM10000 15 %, PH2
# 5 %), warm-started from 2.3.0, 4 × 150 steps, the last epoch's weights. Why: raising ISIC 2017's share from
# none (2.0.0) to 60 % (2.1.0, 2.3.0) is the one change that has moved ISIC 2017 up (+0.014 for 2.3.0), at a
# small HAM10000 cost (-0.005), and the external set is ISIC photos; more training at the same share and a
# larger input (2.4.0) did not help. In float32: the CPU it was trained on has no bfloat16 instructions, and
# `python -m bench.train_precision --rounds 2` measured 1.97 images/s in float32 against 0.24 in
# mixed_bfloat16 there; 4 epochs so that it trains in about an hour at that speed.
PREVIOUS.2.5.0 = 2.3.0
PREVIOUS_COMMIT.2.5.0 = 4dcd57f
PREVIOUS_DATA.2.5.0 = $(RELEASE_DATA)
RELEASE_OPTS.2.5.0 = $(RELEASE_BASE_OPTS) --precision float32 \
  --learning-rate 5e-5 --ema --source-weights isic2017_train=0.8,ham10000=0.15,ph2=0.05 --epochs 4 --seed 46
RELEASE_CHECKPOINT.2.5.0 = last
# Set before its run, 2.4.0's rule: shipped only if it beats 2.3.0 on ISIC 2017 (95 % interval above 0) and
# loses at most 0.005 Jaccard pooled, on the same validation photos (2.0.0's, which 2.3.0 kept).
# Outcome (make release-report RELEASE=2.5.0): ISIC 2017 +0.000 [-0.005, +0.005], pooled -0.005, failures
# 85 -> 102: not shipped. A larger ISIC 2017 share than 2.3.0's 60 % gained nothing there and cost HAM10000.
RELEASE_REPORT_OPTS.2.5.0 = $(ISIC_RULE)
# 2.6.0: 2.3.0's recipe (192², ISIC 2017 at 60 % of each epoch) with one option added, the photometric jitter
# (brightness, contrast, gamma, hue and saturation; training/augment.py), warm-started from 2.3.0, 3 × 150
# steps in float32, the last epoch's weights. Why: issue 12 names it for the external set's failures (faint,
# low-contrast lesions and rims), and it was never measured alone: LOSO `bundle` had it together with the
# Jaccard term and 180° rotation (-0.028), and the Jaccard term alone (`jaccard`) already lost -0.023 there.
# 2.5.0 showed that 4 more epochs of 2.3.0's data mix from 2.3.0 move ISIC 2017 by +0.000, so a gain here
# is the jitter's. 3 epochs so that it trains within one sitting at this CPU's 1.3 images/s.
PREVIOUS.2.6.0 = 2.3.0
PREVIOUS_COMMIT.2.6.0 = 4dcd57f
PREVIOUS_DATA.2.6.0 = $(RELEASE_DATA)
RELEASE_OPTS.2.6.0 = $(RELEASE_BASE_OPTS) --precision float32 --photometric \
  --learning-rate 5e-5 --ema --source-weights isic2017_train=0.6,ham10000=0.3,ph2=0.1 --epochs 3 --seed 47
RELEASE_CHECKPOINT.2.6.0 = last
# Set before its run, 2.4.0's rule: shipped only if it beats 2.3.0 on ISIC 2017 (95 % interval above 0) and
# loses at most 0.005 Jaccard pooled, on the same validation photos (2.0.0's, which 2.3.0 kept).
# Outcome (make release-report RELEASE=2.6.0): ISIC 2017 +0.000 [-0.005, +0.005], pooled -0.002, failures
# 85 -> 92: not shipped. The jitter alone, from 2.3.0, moved ISIC 2017 no more than 2.5.0's 4 epochs did.
RELEASE_REPORT_OPTS.2.6.0 = $(ISIC_RULE)
# 2.7.0: 2.3.0's recipe (192², ISIC 2017 at 60 % of each epoch) with Shades of Gray colour constancy inside the
# network (--color-constancy), warm-started from 2.3.0, 6 × 150 steps, the last epoch's weights. Why: the
# external set's photos come from other cameras and lights. The leave-one-source-out check did not settle it:
# `sog` gained +0.014 [+0.008, +0.020] on ISIC 2017 over `base`, but `base-seed43` (base with another seed)
# scored -0.090 [-0.098, -0.083] against `base`, so this small, short check moves more with the seed than with
# the option and the rule above was not met (`zoom40` was not run: it could not have been told apart either).
# So colour constancy is tried where the comparison is steadier, fine-tuned from the same weights and paired on
# the same photos: 2.5.0 and 2.6.0, run so from 2.3.0, each moved ISIC 2017 by +0.000 [-0.005, +0.005].
# In mixed_bfloat16: the CPU it was trained on has AMX, and `python -m bench.train_precision --rounds 2`
# measured 7.8 images/s against 5.2 in float32.
PREVIOUS.2.7.0 = 2.3.0
PREVIOUS_COMMIT.2.7.0 = 4dcd57f
PREVIOUS_DATA.2.7.0 = $(RELEASE_DATA)
RELEASE_OPTS.2.7.0 = $(RELEASE_OPTS.2.1.0) --color-constancy --seed 48
RELEASE_CHECKPOINT.2.7.0 = last
# Set before its run, 2.4.0's rule: shipped only if it beats 2.3.0 on ISIC 2017 (95 % interval above 0) and
# loses at most 0.005 Jaccard pooled, on the same validation photos (2.0.0's, which 2.3.0 kept).
# Outcome (make release-report RELEASE=2.7.0): ISIC 2017 +0.002 [-0.005, +0.010], pooled -0.002, failures
# 85 -> 98: not shipped. Trained at 6.8-8.9 images/s in mixed_bfloat16 here, no faster than 2.6.0 in float32
# (7.8-9.0) on the same machine: bench.train_precision's 1.49x is the network's step alone.
RELEASE_REPORT_OPTS.2.7.0 = $(ISIC_RULE) $(LOSO_OPTIONS)
PREVIOUS = $(PREVIOUS.$(RELEASE))
PREVIOUS_DIR = runs/v$(PREVIOUS)
RELEASE_RUN = runs/release-$(RELEASE)
RELEASE_MODEL = $(RELEASE_RUN)/model
RELEASE_THRESHOLD ?= 0.5
# The exported weights: best (lowest validation loss) unless the release says last (the last epoch's).
RELEASE_CHECKPOINT = $(or $(RELEASE_CHECKPOINT.$(RELEASE)),best)
release-previous: $(BIN)/.dev-deps ## the release before RELEASE from git into runs/vPREVIOUS: ONNX file, card, recovered checkpoint
	@test -n "$(PREVIOUS)" || { echo "no release $(RELEASE) is defined in the Makefile"; exit 2; }
	mkdir -p $(PREVIOUS_DIR)
	git show $(PREVIOUS_COMMIT.$(RELEASE)):models/dermaseg.onnx > $(PREVIOUS_DIR)/dermaseg.onnx
	git show $(PREVIOUS_COMMIT.$(RELEASE)):models/dermaseg.json > $(PREVIOUS_DIR)/dermaseg.json
	test -f $(PREVIOUS_DIR)/recover.json || $(BIN)/dermaseg recover --model $(PREVIOUS_DIR)/dermaseg.onnx \
	  --card $(PREVIOUS_DIR)/dermaseg.json $(PREVIOUS_DATA.$(RELEASE)) \
	  --out $(PREVIOUS_DIR)/recovered.keras > $(PREVIOUS_DIR)/recover.json

release-train: release-previous ## train release RELEASE into runs/release-RELEASE (resumes), warm-started from the previous one
	if [ -f $(RELEASE_RUN)/config.json ]; then \
	  $(BIN)/dermaseg train --resume $(RELEASE_RUN); \
	else \
	  $(BIN)/dermaseg train $(RELEASE_DATA) --out $(RELEASE_RUN) --init-from $(PREVIOUS_DIR)/recovered.keras \
	    --split-like $(PREVIOUS_DIR)/dermaseg.json $(RELEASE_OPTS.$(RELEASE)); \
	fi

release-export: $(BIN)/.dev-deps ## export runs/release-RELEASE/best.keras (or last.keras) to its model/ folder (float16 shipped) with its card
	$(BIN)/dermaseg export --checkpoint $(RELEASE_RUN)/$(RELEASE_CHECKPOINT).keras --out $(RELEASE_MODEL)/dermaseg.onnx --name dermaseg \
	  --version $(RELEASE) --threshold $(RELEASE_THRESHOLD) --variants float16 int8 --ship float16 \
	  --calibration-data $(DATA)/ph2 --calibration-data $(DATA)/isic2017_train --calibration-data $(DATA)/ham10000

# The candidate on its validation split (every source; each post-processing; thresholds 0.3–0.8, with 0.45
# and 0.55 beside the usual 0.5), the previous release on the same photos (none of which either trained on),
# and the sample photos at their original size.
RELEASE_EVAL = $(BIN)/dermaseg evaluate --model $(RELEASE_MODEL)/dermaseg.onnx --card $(RELEASE_MODEL)/dermaseg.json \
  $(RELEASE_DATA) --split $(RELEASE_RUN)/split.json
release-score: $(BIN)/.dev-deps ## what the shipping rule needs: release RELEASE as served and the previous one, on its validation split
	$(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_plain.json
	$(BIN)/dermaseg evaluate --model $(PREVIOUS_DIR)/dermaseg.onnx --card $(PREVIOUS_DIR)/dermaseg.json $(RELEASE_DATA) \
	  --split $(RELEASE_RUN)/split.json --out $(RELEASE_RUN)/previous_val_plain.json

release-eval: release-score ## score release RELEASE and the previous one on its validation split (each variant), and samples/
	$(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_tta.json --flip-tta
	$(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_lc.json --largest-component
	$(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_fh.json --fill-holes
	$(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_all.json --flip-tta --largest-component --fill-holes
	for t in 0.3 0.4 0.45 0.5 0.55 0.6 0.7 0.8; do \
	  $(RELEASE_EVAL) --out $(RELEASE_RUN)/eval_val_t$$t.json --threshold $$t --label threshold_$$t || exit 1; \
	done
	$(BIN)/dermaseg evaluate --model $(RELEASE_MODEL)/dermaseg.onnx --card $(RELEASE_MODEL)/dermaseg.json \
	  --data $(DATA)/samples --out $(RELEASE_RUN)/eval_samples.json --overlays $(RELEASE_RUN)/overlays_samples

release-ship: ## copy release RELEASE's ONNX file and card into models/ (then: make calibrate-quality release-report)
	cp $(RELEASE_MODEL)/dermaseg.onnx $(RELEASE_MODEL)/dermaseg.json models/

calibrate-quality: $(BIN)/.dev-deps ## fit models/dermaseg.quality.json on unseen photos; docs/quality-calibration.json and docs/quality.md
	nice -n 10 $(BIN)/python -m training.cli calibrate-quality --model models/dermaseg.onnx --card models/dermaseg.json \
	  --data $(DATA)/ham10000 --data $(DATA)/isic2017_train --data $(DATA)/ph2 --max-per-source 3000 --seed 14 \
	  --flip-agreement --rows runs/quality/rows.csv --out models/dermaseg.quality.json \
	  --report docs/quality-calibration.json
	$(BIN)/python -m training.quality_report

report: $(BIN)/.dev-deps ## write docs/results.md from the run directories in runs/ (the reproduction's and releases')
	$(BIN)/python -m training.report
	$(BIN)/python -m training.release_report

release-report: $(BIN)/.dev-deps ## rewrite release RELEASE's section of docs/results.md (and, once shipped, the card's evidence)
	$(BIN)/python -m training.release_report --release $(RELEASE_RUN) $(RELEASE_REPORT_OPTS.$(RELEASE))

# Leave-one-source-out ranking of recipe options (issue 12): train on the other sources without HELD_OUT
# (default the ISIC 2017 training images), small and short, then score on HELD_OUT. `make loso NAME=base`,
# then e.g. `make loso NAME=jaccard RECIPE="--loss focal+jaccard"` and `make loso-compare A=base B=jaccard`;
# `make loso NAME=ham-base HELD_OUT=ham10000` trains on PH2 + ISIC 2017 and scores HAM10000.
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
HELD_OUT ?= isic2017_train
LOSO_TRAIN = $(foreach source,$(filter-out $(HELD_OUT),$(SOURCES)),--data $(DATA)/$(source))
LOSO_RUN = runs/loso-$(NAME)
loso: $(BIN)/.dev-deps ## leave-one-source-out: train RECIPE="..." without HELD_OUT (isic2017_train) into runs/loso-NAME, score on it
	if [ -f $(LOSO_RUN)/config.json ]; then \
	  $(BIN)/dermaseg train --resume $(LOSO_RUN) --epochs $(LOSO_EPOCHS); \
	else \
	  $(BIN)/dermaseg train $(LOSO_TRAIN) --out $(LOSO_RUN) \
	    --image-size $(LOSO_SIZE) --epochs $(LOSO_EPOCHS) --steps-per-epoch $(LOSO_STEPS) $(LOSO_OPTS) $(RECIPE); \
	fi
	$(BIN)/dermaseg evaluate --model $(LOSO_RUN)/best.keras --data $(DATA)/$(HELD_OUT) \
	  --out $(LOSO_RUN)/eval_held_out.json

# Set before their runs (after 2.6.0): two options no run had measured, each against a fresh `base` (same seed,
# same code), trained and scored by `make loso NAME=X RECIPE=...`; an option goes into a release candidate only
# if it beats `base` on the held-out ISIC 2017 photos with the whole 95 % interval above 0 (release_report's
# rule for this table):
#   sog:    --color-constancy   Shades of Gray colour constancy inside the network (training/model.py): the
#           external set's photos come from other cameras and lights, and its failures are faint lesions.
#   zoom40: --zoom 0.4          the scale range 0.6-1.4 instead of 0.8-1.2: the external set's failures include
#           lesions that fill most of the frame.
# The fresh `base` scored 0.656 on ISIC 2017 where 2.0.0's `base` (same recipe and seed, another machine) had
# scored 0.681: retraining moves this check by more than the paired interval shows. So, also set before the
# option runs were scored, `base-seed43` (`RECIPE="--seed 43"`, the same recipe with another seed) measures
# that spread, and an option also has to gain more than base-seed43 differs from base.
# Outcome: base-seed43 -0.090 [-0.098, -0.083] against base (0.566 against 0.656), sog +0.014 [+0.008, +0.020]:
# the seed moves this check six times as far as colour constancy did, so the rule was not met.
LOSO_OPTIONS = --loso base runs/loso-base --loso base-seed43 runs/loso-base-seed43 --loso sog runs/loso-sog

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
