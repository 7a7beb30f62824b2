"""User errors: bad files, records or flags. The CLI prints one line and exits 2."""


class UserError(Exception):
    """An error in what the user gave us; the message names the file/record/flag."""
