# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make book   build the book (default profile) and its slide decks into _build/html and show where they are
#   make test   every test: package tests, every notebook through nbval (smoke profile), the course kit
#               (student notebooks autograded with nbgrader), the rendered book and decks in headless Chromium,
#               and the Colab-like run (a wheel in a fresh venv with torch 2.13.0 CPU)
# And for teachers:
#   make course build the student notebooks (_build/course/student) and autograde both versions
PYTHON  ?= python3
VENV    ?= .venv
PROFILE ?= default
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: book test install chromium web course serve clean

$(VENV)/.installed: pyproject.toml requirements/pins.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch/torchvision pinned to the builds on this machine's disk (fast; never a surprise multi-GB pull)
	$(PIP) install -r requirements/pins.txt
	$(PIP) install -c requirements/pins.txt -e ".[book,test,vision,course]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

chromium:
	bash scripts/ensure_chromium.sh

# MathJax and reveal.js from the npm registry (scripts/web/package.json): the book serves them itself.
web:
	bash scripts/ensure_web_assets.sh

course: install
	MOMLP_PROFILE=smoke $(BIN)/python scripts/build_course.py --grade

book: install web
	$(BIN)/python scripts/build_book.py --profile $(PROFILE)
	@$(BIN)/python -m webbrowser -t "file://$(CURDIR)/_build/html/index.html" >/dev/null 2>&1 || true
	@echo "Open file://$(CURDIR)/_build/html/index.html  (or: make serve); decks: _build/html/slides/<chapter>.slides.html"

serve:
	$(BIN)/python -m http.server --directory _build/html 8000

test: install chromium web
	MOMLP_PROFILE=smoke $(BIN)/python -m pytest

clean:
	rm -rf _build book/_static/mathjax book/_static/revealjs
