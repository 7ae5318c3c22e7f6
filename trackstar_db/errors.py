"""The one exception type users see: a clear, one-line message about their input."""


class TrackstarError(ValueError):
    """Bad input or a database in the wrong state; the message names the file, line or field."""


class RecordError(TrackstarError):
    """A bad record in an input file."""

    def __init__(self, path, line: int, message: str):
        self.path, self.line, self.reason = str(path), line, message
        super().__init__(f"{path}:{line}: {message}")
