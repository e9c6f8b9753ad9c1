"""Exception types of slicreg.

Every error caused by bad input (a missing or corrupt file, a wrong shape, an unknown option) is raised as
:class:`InputError`, a :class:`ValueError` whose message names the file or argument, what was expected and
what came. The command-line layer prints such errors as one line and exits with status 2, so a user never
sees a traceback from deep inside for a mistake in their input.
"""


class InputError(ValueError):
    """Bad input: the message names the file or argument, what was expected and what came."""


class ConfigError(InputError):
    """A pipeline configuration that cannot be run (unknown key, unknown stage, missing input)."""
