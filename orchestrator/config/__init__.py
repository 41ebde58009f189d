"""What a user writes: every YAML nslab reads goes through loader.py (dotted paths: paths.py) into the typed
models of experiment.py, study.py (+ search_space.py, arms.py) and analysis.py."""


class ConfigError(ValueError):
    """A config mistake; str() is one line starting with 'config error:'."""
