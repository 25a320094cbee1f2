"""Model card templates (Jinja2 markdown) that `peft_ext.hub` renders, one per adapter kind.

A package only so the templates ship in wheels and resolve through `importlib.resources`; see `peft_ext/hub.py`.
"""
