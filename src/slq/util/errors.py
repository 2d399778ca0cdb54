"""The error types users see: a clear, single-line message about bad input."""

from __future__ import annotations


class SlqError(ValueError):
    """Bad input or an unusable model/checkpoint; the CLI prints it as one line and exits 1."""


class ConfigError(SlqError):
    """A setting of a config object is out of range. ``field`` names the setting; the message template
    holds ``{field}`` where it is named, so that the CLI can name its flag instead (see :meth:`render`)."""

    def __init__(self, field: str, template: str):
        self.field, self.template = field, template
        super().__init__(template.replace("{field}", field))

    def render(self, names: dict[str, str]) -> str:
        """The message with the field spelled as ``names`` spells it (e.g. a CLI flag)."""
        return self.template.replace("{field}", names.get(self.field, self.field))
