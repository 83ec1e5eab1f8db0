"""Recommenders behind one interface; `MODELS` maps a `--model` name to its class."""
