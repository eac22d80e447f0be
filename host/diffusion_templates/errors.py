"""Errors the host raises. Each names the template or carrier at fault and what was expected."""

from __future__ import annotations

from typing import Any


class TemplateError(Exception):
    """Base class of every error raised by Diffusion Templates."""


class PluginError(TemplateError):
    """A plugin could not be found, loaded or used."""

    def __init__(self, message: str, *, plugin: str | None = None, distribution: str | None = None):
        where = ""
        if plugin:
            where = f"plugin {plugin!r}"
            if distribution:
                where += f" (distribution {distribution!r})"
            where += ": "
        super().__init__(where + message)
        self.plugin = plugin
        self.distribution = distribution


class UnknownTemplateError(PluginError):
    """No installed template has this name."""


class TemplateInputError(TemplateError, ValueError):
    """A template's inputs did not validate. ``errors`` lists (field, message, got) triples."""

    def __init__(self, template: str, errors: list[tuple[str, str, object]]):
        lines = [f"invalid inputs for template {template!r}:"]
        for field, message, got in errors:
            lines.append(f"  - field {field!r}: {message} (got {got!r})")
        super().__init__("\n".join(lines))
        self.template = template
        self.errors = errors

    @classmethod
    def from_validation_error(cls, template: str, exc: Any) -> TemplateInputError:
        """From a pydantic ``ValidationError``: one (field path, message, value) per problem."""
        errors = [
            (".".join(str(p) for p in e["loc"]) or "<inputs>", e["msg"], e.get("input")) for e in exc.errors()
        ]
        return cls(template, errors)


def validate_inputs(template: str, schema: Any, fields: Any) -> Any:
    """``schema.model_validate(fields)``, with errors as :class:`TemplateInputError` naming the template."""
    try:
        return schema.model_validate(fields)
    except Exception as exc:
        from pydantic import ValidationError  # imported on the error path only (hot on every call)

        if isinstance(exc, ValidationError):
            raise TemplateInputError.from_validation_error(template, exc) from None
        raise


class CacheError(TemplateError, ValueError):
    """A Template cache is malformed, or does not fit the backbone it is injected into."""


class CarrierConflictError(TemplateError, ValueError):
    """Several caches of one carrier cannot be merged."""


class UnsupportedError(TemplateError):
    """A carrier, template or pipeline is not supported by the backbone adapter in use."""


def check_window(model: Any, message: str, *, start: str = "start", end: str = "end") -> None:
    """In an input schema's ``model_validator(mode="after")``: refuse ``model.<start> >= model.<end>``.

    A model validator sees both fields whatever the user gave: a field validator on ``end`` never runs
    for ``end``'s default, so ``start=1.0`` alone used to pass and fail later, inside a carrier. The
    error is reported on the ``end`` field (as the schemas' field validators did), with ``message``
    formatted with both values (``{start}``, ``{end}``), e.g. ``"end ({end}) must be above start
    ({start})"``.
    """
    low, high = getattr(model, start), getattr(model, end)
    if low < high:
        return
    from pydantic import ValidationError  # the error path only
    from pydantic_core import InitErrorDetails, PydanticCustomError

    text = message.format(start=low, end=high).replace("{", "{{").replace("}", "}}")
    detail = InitErrorDetails(type=PydanticCustomError("value_error", text), loc=(end,), input=high)
    raise ValidationError.from_exception_data(type(model).__name__, [detail])
