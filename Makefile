# The two commands of the README. Both set up ./.venv on first use (offline-capable, CPU torch by default).
.PHONY: tour test

tour:
	./scripts/bootstrap.sh demo
	HF_HUB_OFFLINE=1 .venv/bin/python recipes/tour.py $(ARGS)

test:
	./scripts/bootstrap.sh dev
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest $(ARGS)
