"""User errors: bad files, records or flags. The CLI prints one line and exits 2."""


class UserError(Exception):
    """An error in what the user gave us; the message names the file/record/flag."""


class Interrupted(Exception):
    """A run stopped on a signal after saving its state; the CLI exits with 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
