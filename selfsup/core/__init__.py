"""The layer below every other: what all of selfsup shares and that needs none of it.

- errors.py        UserError (bad input, printed as one line) and the nearest-name hints
- atomic.py        the one way to write a file so that a reader sees the old or the new one, whole
- config_files.py  finding and loading configs/<group>/<name>.yaml (and `data=` choices)
- overrides.py     `key=value` parsing, type checks against the composed config
- config_hash.py   a config's YAML text and the hash that checkpoints record
- run_folder.py    a run's folder: its name, its config.yaml

Nothing here imports another selfsup module, nor torch (the CLI imports this at start-up).
Layer order, each importing only its own or lower layers (tests/test_architecture.py):
core < backbones < data < ssl < export < eval < continual < report < launch.
"""
