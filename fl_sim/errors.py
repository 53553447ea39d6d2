"""The errors fl-sim raises on bad input: one line that names the problem and the fix."""


class FlSimError(Exception):
    """Base class: the CLI prints ``fl-sim: error: <message>`` and exits 2, no traceback."""


class ConfigError(FlSimError, ValueError):
    """A bad knob value or a bad combination of knobs."""


class CheckpointError(FlSimError):
    """A checkpoint that is missing, unreadable, pickled, or incompatible with the others."""
