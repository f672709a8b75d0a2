"""Exception types that cross layer boundaries; the server maps each to an HTTP status."""


class InferdError(Exception):
    """Base class: a message a user can act on."""

    status_code = 500
    error_type = "internal_error"


class InvalidRequestError(InferdError, ValueError):
    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelNotFoundError(InferdError, LookupError):
    status_code = 404
    error_type = "model_not_found"


class ModelLoadError(InferdError):
    """A model file is missing, corrupt or of an unsupported kind."""

    status_code = 500
    error_type = "model_load_error"


class ModelNotReadyError(InferdError):
    """The model is configured but still loading: retry later (503 + Retry-After)."""

    status_code = 503
    error_type = "model_not_ready"


class OverloadedError(InferdError):
    status_code = 503
    error_type = "overloaded"
