# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make book   build the book (default profile) into _build/html and show where it is
#   make test   every test: package tests, every notebook through nbval (smoke profile),
#               and the rendered-book check in headless Chromium
PYTHON  ?= python3
VENV    ?= .venv
PROFILE ?= default
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: book test install chromium serve clean

$(VENV)/.installed: pyproject.toml requirements/pins.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch/torchvision pinned to the builds on this machine's disk (fast; never a surprise multi-GB pull)
	$(PIP) install -r requirements/pins.txt
	$(PIP) install -c requirements/pins.txt -e ".[book,test,vision]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

chromium:
	bash scripts/ensure_chromium.sh

book: install
	$(BIN)/python scripts/build_book.py --profile $(PROFILE)
	@$(BIN)/python -m webbrowser -t "file://$(CURDIR)/_build/html/index.html" >/dev/null 2>&1 || true
	@echo "Open file://$(CURDIR)/_build/html/index.html  (or: make serve)"

serve:
	$(BIN)/python -m http.server --directory _build/html 8000

test: install chromium
	MOMLP_PROFILE=smoke $(BIN)/python -m pytest

clean:
	rm -rf _build
