"""The one exception type for problems the user can fix.

`sptlm` prints a UserError as one line on stderr (no traceback) and exits non-zero; anything
else is an internal error and keeps its traceback, so a bug is never disguised as bad input.
Every module's own user-error type (ConfigError, TrainingError, ConversionError, ...) derives
from it.
"""


class UserError(Exception):
  """A problem the user can fix: the message names the key, file or value and what to do."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named (or has to make first) is not there.

  Also a FileNotFoundError, so Python callers that catch that keep working.
  """


class InputError(UserError, ValueError):
  """Input the user gave (a flag, a file's contents, a corpus) that cannot be used.

  Also a ValueError, so Python callers that catch that keep working.
  """


class ConfigError(UserError, ValueError):
  """A config file or override that cannot be used; the message names the key."""
