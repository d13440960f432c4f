"""The one error type of the demo's API: a message for the operator, a status code and a kind."""


class DemoError(Exception):
    """An error the API answers with `status` and a message meant for the operator."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_request"):
        super().__init__(message)
        self.status = status
        self.kind = kind
