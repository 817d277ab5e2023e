# Two commands do all set-up on a fresh machine:  make demo  |  make test
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DATA    ?= $(or $(BIOUNET_DATA),../shared/data)
DEMO    ?= demo_out
DEMO_STEPS ?= 400

.PHONY: install test display lint demo demo-train bench-deps clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,cluster,export,napari,qt,openvino,onnxruntime]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) display
	$(PY) -m pytest -q

# The napari GUI test runs a real viewer on a virtual display: Xvfb and the X libraries Qt's
# xcb platform loads, from Debian's packages, where this machine lets us install them (root
# with apt-get); else that one test says why it skips.
XPKGS := xvfb libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-render-util0 \
	libxcb-xinerama0 libxcb-xkb1 libxcb-shape0 libxcb-randr0 libxkbcommon-x11-0 libdbus-1-3 \
	libfontconfig1 libegl1 libgl1 libgl1-mesa-dri
display:
	@{ command -v Xvfb >/dev/null && ldconfig -p | grep -q libxcb-cursor; } || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		echo "make test: installing Xvfb and Qt's X libraries (Debian packages) for the napari GUI test" && \
		{ apt-get install -y -q $(XPKGS) >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(XPKGS) >/dev/null 2>&1; }; }; } || \
	echo "make test: could not install Xvfb and Qt's X libraries (apt-get install $(XPKGS)); the napari GUI test will skip"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

# The main job: the shipped ISBI 2012 model segments the challenge's test slices.
# DATA (or $BIOUNET_DATA) points at the data folder; MODEL at another model directory.
MODEL   ?= models/isbi2012
demo: $(STAMP)
	@test -d "$(DATA)/isbi2012/test_images" || { echo "make demo: no ISBI 2012 data in $(DATA)/isbi2012; set DATA=... or BIOUNET_DATA=..." >&2; exit 2; }
	$(VENV)/bin/biounet predict "$(MODEL)" "$(DATA)/isbi2012/test_images" \
		--out "$(DEMO)/predictions" --overlay
	@echo
	@echo "Demo done: $(MODEL) segmented $(DATA)/isbi2012/test_images"
	@echo "  masks:     $(DEMO)/predictions/*.tif  (0 = cell interior, 1 = membrane)"
	@echo "  overlays:  $(DEMO)/predictions/*_overlay.png  (membranes in red)"

# Train briefly from scratch instead (what the demo did before a model shipped).
demo-train: $(STAMP)
	rm -rf "$(DEMO)/model"
	$(VENV)/bin/biounet train --images "$(DATA)/isbi2012/images" --masks "$(DATA)/isbi2012/labels" \
		--out "$(DEMO)/model" --foreground 0 --cell-class 0 --class-names interior,membrane \
		--depth 4 --base-channels 16 --tile 228 --steps $(DEMO_STEPS) --val-every 100 --checkpoint-every 100
	$(MAKE) demo MODEL="$(DEMO)/model"

# Benchmark-only extras (MONAI for the peer rows of bench/isbi2012.py and bench/throughput.py).
bench-deps: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache src/*.egg-info
