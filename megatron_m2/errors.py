"""The one exception type users see for a bad flag, config or input."""


class ConfigError(ValueError):
    """A configuration or input problem, raised before any heavy work; the message names the flag and the fix."""
