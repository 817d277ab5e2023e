# Two commands do all set-up on a fresh machine:  make demo  |  make test
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DATA    ?= $(or $(BIOUNET_DATA),../shared/data)
DEMO    ?= demo_out
DEMO_STEPS ?= 400

.PHONY: install test lint demo clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

# Until a trained ISBI model ships: train briefly on ISBI 2012, then segment its test images.
demo: $(STAMP)
	@test -d "$(DATA)/isbi2012" || { echo "make demo: no ISBI 2012 data in $(DATA)/isbi2012; set DATA=... or BIOUNET_DATA=..." >&2; exit 2; }
	rm -rf "$(DEMO)/model"
	$(VENV)/bin/biounet train --images "$(DATA)/isbi2012/images" --masks "$(DATA)/isbi2012/labels" \
		--out "$(DEMO)/model" --foreground 0 --class-names interior,membrane \
		--depth 4 --base-channels 16 --tile 228 --optimizer adam --lr 0.001 \
		--steps $(DEMO_STEPS) --val-every 100 --checkpoint-every 100
	$(VENV)/bin/biounet predict "$(DEMO)/model" "$(DATA)/isbi2012/test_images" \
		--out "$(DEMO)/predictions" --overlay
	@echo
	@echo "Demo done:"
	@echo "  model:        $(DEMO)/model  (training curves: $(DEMO)/model/curves.png)"
	@echo "  masks:        $(DEMO)/predictions/*.tif  (0 = cell interior, 1 = membrane)"
	@echo "  overlays:     $(DEMO)/predictions/*_overlay.png"

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache src/*.egg-info
