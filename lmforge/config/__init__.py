"""Run configuration, the ONE place config values are checked, one module per job:

- `keys`: how a key is declared (type, choices, range) and how a value is parsed and checked against it
- `sections`: the typed sections (model, data, train, optim, finetune) and `Config`, with the rules between
  keys; every section is checked as it is made
- `load`: a config from TOML, dicts and dotted command-line overrides, and back to TOML
"""
